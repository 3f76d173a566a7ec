"""The daemon's output producer on confluent-kafka (librdkafka), with the small part of
kafka-python's ``KafkaProducer`` interface the daemon uses: ``send`` returning a future with
``add_callback``/``add_errback``, ``flush``, ``close``, and :meth:`serve` once per loop turn.

Why: kafka-python's producer runs its network I/O and acknowledgement callbacks on a Python
thread, which takes the GIL from the scoring loop at every request and response (traced: an
alert handed over, sent and acknowledged in 7.2 ms of wall time for 1 ms of CPU under load).
librdkafka does its I/O on native threads without the GIL, and runs delivery callbacks on the
thread that calls ``poll``/``flush``: the loop's, at points the loop chooses.

Delivery semantics are the same: a record counts as acknowledged when its delivery report
says so (``acks=all`` with idempotence: no duplicates or reordering on retries), and the
checkpoint waits for those reports before saving state and committing offsets.
"""

from __future__ import annotations

import logging
from typing import Any

from daemon.config import DaemonConfig
from daemon.errors import DaemonError

__all__ = ["ConfluentProducer", "confluent_connection", "confluent_settings"]

log = logging.getLogger("daemon.output")


def confluent_settings(cfg: DaemonConfig) -> dict[str, Any]:
    """librdkafka producer settings equivalent to the daemon's kafka-python ones."""
    opts: dict[str, Any] = {
        "bootstrap.servers": cfg.bootstrap,
        "security.protocol": cfg.security_protocol,
        "acks": cfg.acks if cfg.acks == "all" else int(cfg.acks),
        "enable.idempotence": cfg.acks == "all",
        "max.in.flight.requests.per.connection": 5,
        "linger.ms": cfg.linger_ms,
        "batch.size": cfg.batch_size,
        "request.timeout.ms": cfg.request_timeout_ms,
        # The Java client's (and kafka-python's) partitioner: a stream's alerts land in the
        # same partition whichever client the daemon uses.
        "partitioner": "murmur2_random",
        "queue.buffering.max.messages": max(100_000, 2 * cfg.max_pending_messages),
    }
    names = {"sasl_mechanism": "sasl.mechanism", "sasl_plain_username": "sasl.username",
             "sasl_plain_password": "sasl.password", "ssl_cafile": "ssl.ca.location",
             "ssl_certfile": "ssl.certificate.location", "ssl_keyfile": "ssl.key.location",
             "ssl_password": "ssl.key.password"}
    for ours, theirs in names.items():
        if getattr(cfg, ours):
            opts[theirs] = getattr(cfg, ours)
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        opts["ssl.endpoint.identification.algorithm"] = "https" if cfg.ssl_check_hostname else "none"
    return opts


def confluent_connection(cfg: DaemonConfig) -> dict[str, Any]:
    """The connection and security part of :func:`confluent_settings`, for other librdkafka
    clients (the changelog reader: a consumer, which warns on every start about producer
    properties such as ``request.timeout.ms``)."""
    return {k: v for k, v in confluent_settings(cfg).items()
            if k in ("bootstrap.servers", "security.protocol") or k.startswith(("sasl.", "ssl."))}


class _Delivery:
    """A sent record's future: callbacks run with the record's metadata (acknowledged) or
    errbacks with the exception (failed), as kafka-python's futures call them."""

    __slots__ = ("callbacks", "errbacks")

    def __init__(self) -> None:
        self.callbacks: list = []
        self.errbacks: list = []

    def add_callback(self, f, *args) -> "_Delivery":
        self.callbacks.append((f, args))
        return self

    def add_errback(self, f, *args) -> "_Delivery":
        self.errbacks.append((f, args))
        return self

    def __call__(self, err, msg) -> None:  # librdkafka's delivery report, on the polling thread
        if err is None:
            for f, args in self.callbacks:
                f(*args, msg)
        else:
            from confluent_kafka import KafkaException

            exc = KafkaException(err)
            for f, args in self.errbacks:
                f(*args, exc)


class ConfluentProducer:
    """Output records through librdkafka (see the module docstring)."""

    def __init__(self, cfg: DaemonConfig) -> None:
        try:
            from confluent_kafka import KafkaException, Producer
        except ImportError:
            raise DaemonError("producer_client = 'confluent-kafka' needs the confluent-kafka package "
                              "(pip install confluent-kafka)") from None
        if cfg.sasl_oauth_token:
            raise DaemonError("sasl_oauth_token is not supported with producer_client = 'confluent-kafka'; "
                              "use producer_client = 'kafka-python'")
        try:
            self._producer = Producer(confluent_settings(cfg), logger=log)
        except KafkaException as exc:
            raise DaemonError(f"cannot create the confluent-kafka producer: {exc}") from None

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None, headers=None,
             partition: int | None = None) -> _Delivery:
        fut = _Delivery()
        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": fut}
        if headers:
            kwargs["headers"] = headers
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                return fut
            except BufferError:  # librdkafka's queue is full: serve reports until there is room
                self._producer.poll(0.05)

    def serve(self) -> None:
        """Run the delivery reports that have arrived (without waiting)."""
        self._producer.poll(0)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every record sent is acknowledged or failed (reports run here)."""
        left = self._producer.flush(-1 if timeout is None else timeout)
        if left:
            raise DaemonError(f"{left} output records still unacknowledged after {timeout} s")

    def close(self, timeout: float | None = None) -> None:
        self.flush(timeout)
