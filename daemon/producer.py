"""Producing events to an input topic, in the daemon's input format (``streamrnn replay
--to-kafka``, the demo, the tests and the benchmark use it)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from daemon.codec import Format, encode_events
from daemon.errors import DaemonError

__all__ = ["produce_events", "ProduceResult"]


@dataclass
class ProduceResult:
    """What :func:`produce_events` sent; ``messages`` counts the broker's acknowledgements."""

    messages: int
    events: int
    seconds: float
    input_stats: dict = field(default_factory=dict)  # what reading the files did (replay --to-kafka)


def _batch_arrays(batch):
    if hasattr(batch, "stream_ids"):
        ids, ts, values = batch.stream_ids, getattr(batch, "ts", None), batch.values
        if ts is None:
            ts = batch.timestamps
    else:
        ids, ts, values = batch
    ts = np.asarray(ts)
    if ts.dtype.kind == "M":
        ts = ts.astype("datetime64[ms]").astype(np.int64)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    return [str(s) for s in ids], ts.astype(np.int64), x


def _messages(ids, ts, x, per_message: int):
    """(key, first event index, event indices) per message: up to ``per_message`` events of
    one stream each, in order of their first event, each stream's events in order."""
    if per_message == 1:
        for i, s in enumerate(ids):
            yield s, i, [i]
        return
    open_: dict[str, list[int]] = {}
    out: list[tuple[int, str, list[int]]] = []
    for i, s in enumerate(ids):
        cur = open_.get(s)
        if cur is None or len(cur) == per_message:
            cur = open_[s] = []
            out.append((i, s, cur))
        cur.append(i)
    for first, s, idx in out:
        yield s, first, idx


def produce_events(bootstrap: str, topic: str, batches: Iterable, speed: float | None = None,
                   events_per_message: int = 1, *, feature_names: list[str] | None = None,
                   fmt: Format | None = None, arrow: bool = False, producer=None,
                   producer_options: dict | None = None) -> ProduceResult:
    """Produce events to ``topic``, keyed by stream id, in the daemon's input format.

    Parameters
    ----------
    bootstrap : str
        ``HOST:PORT`` of the broker.
    batches : iterable
        Event batches in time order: objects with ``stream_ids``, ``ts`` (or ``timestamps``)
        and ``values`` (E, D), or ``(stream_ids, ts, values)`` tuples.
    speed : float, optional
        Send at ``speed`` times the original pace given by the event timestamps
        (None: as fast as possible).
    events_per_message : int
        Events of one stream packed per message (a JSON array, or Arrow IPC with ``arrow``).
    feature_names : list of str, optional
        Names of the value columns (default ``value`` for one feature, ``x0, x1, ...``).
    producer : KafkaProducer, optional
        Use this producer (not closed) instead of creating one.

    Returns
    -------
    ProduceResult
        Messages acknowledged by the broker, events sent, seconds taken.
    """
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    if events_per_message < 1:
        raise DaemonError(f"events_per_message must be >= 1, got {events_per_message}")
    if speed is not None and speed <= 0:
        raise DaemonError(f"speed must be > 0, got {speed}")
    own = producer is None
    if own:
        opts = {"linger_ms": 5, "batch_size": 256 << 10, "acks": "all"} | (producer_options or {})
        try:
            producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), **opts)
        except KafkaError as exc:
            raise DaemonError(f"cannot connect to Kafka at {bootstrap}: {exc}") from None
    acked = [0]
    failed: list[Exception] = []
    on_ok = lambda _m: acked.__setitem__(0, acked[0] + 1)  # noqa: E731
    t0 = time.perf_counter()
    wall0 = ts0 = None
    events = 0
    try:
        for batch in batches:
            ids, ts, x = _batch_arrays(batch)
            names = feature_names or (["value"] if x.shape[1] == 1 else [f"x{j}" for j in range(x.shape[1])])
            for key, first, idx in _messages(ids, ts, x, events_per_message):
                if speed is not None:
                    if wall0 is None:
                        wall0, ts0 = time.monotonic(), int(ts[first])
                    delay = wall0 + (int(ts[first]) - ts0) / 1000.0 / speed - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                value = encode_events([ids[i] for i in idx], ts[idx], x[idx], names, fmt=fmt, arrow=arrow)
                fut = producer.send(topic, key=key.encode(), value=value)
                fut.add_callback(on_ok)
                fut.add_errback(failed.append)
                events += len(idx)
        producer.flush()
    finally:
        if own:
            producer.close()
    if failed:
        raise DaemonError(f"{len(failed)} messages were not acknowledged by {bootstrap}: {failed[0]}")
    return ProduceResult(acked[0], events, time.perf_counter() - t0)
