"""Argument parsing shared by ``python -m daemon`` and ``streamrnn daemon``."""

from __future__ import annotations

import argparse
import sys

from daemon.errors import DaemonError
from streamrnn.errors import StreamrnnError

__all__ = ["main", "build_config"]


def build_config(*, config: str | None = None, settings: list[str] | None = None, **flags):
    """A validated :class:`~daemon.config.DaemonConfig` from a TOML path, the environment,
    ``--set NAME=VALUE`` pairs and the named flags (None = not given)."""
    from daemon.config import check_setting_name, load_config

    overrides = {}
    for item in settings or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise DaemonError(f"--set takes NAME=VALUE, got {item!r}")
        name = name.strip().replace("-", "_")
        check_setting_name(name, f"--set {item}")
        overrides[name] = value
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(config, overrides=overrides)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m daemon", description="The streamrnn Kafka scoring daemon.")
    p.add_argument("--bootstrap", help="Kafka bootstrap HOST:PORT[,HOST:PORT]")
    p.add_argument("--input", help="input topic(s), comma-separated")
    p.add_argument("--alerts", help="alerts topic")
    p.add_argument("--model", help="model file")
    p.add_argument("--group", help="consumer group id")
    p.add_argument("--state-dir", dest="state_dir", help="directory for local state snapshots")
    p.add_argument("--config", help="TOML file of settings (deploy/daemon.toml is a commented example)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                   help="any other setting (repeatable): NAME is a key of the TOML file, e.g. metrics_port=9100")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from daemon.config import unknown_env_warnings

    for line in unknown_env_warnings():
        print(f"warning: {line}", file=sys.stderr)
    try:
        cfg = build_config(config=args.config, settings=args.settings, bootstrap=args.bootstrap, input=args.input,
                           alerts=args.alerts, model=args.model, group=args.group, state_dir=args.state_dir)
        from daemon.loop import run_daemon

        return run_daemon(cfg, exit_on_overrun=True)
    except StreamrnnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
