"""Shared pieces of the daemon tests: a seeded scenario, a model that raises alerts on it,
the replay reference, an independent Kafka client (confluent-kafka), and daemon processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamrnn.alerts import Alert, decode_alert
from streamrnn.model import Model
from streamrnn.synthetic import spiky_fleet

ROOT = Path(__file__).resolve().parent.parent
#: Short group timeouts: the development broker makes a join wait for the rebalance timeout.
FAST_GROUP = {"session_timeout_ms": 6000, "max_poll_interval_ms": 3000, "heartbeat_interval_ms": 500}
SCORING = {"warmup": 5}


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def persistence_model(path: Path) -> Path:
    """A GRU that predicts 'next = last' on scaled values: spikes give large errors."""
    h = 8
    layer = {"w_ih": np.zeros((3 * h, 1)), "w_hh": np.zeros((3 * h, h)),
             "b_ih": np.zeros(3 * h), "b_hh": np.zeros(3 * h)}
    layer["b_ih"][h:2 * h] = -30.0  # update gate closed: h' = n
    layer["w_ih"][2 * h:, 0] = 0.05  # n = tanh(0.05 x) ~ 0.05 x
    m = Model(cell="gru", layers=[layer], head_weight=np.full((1, h), 1.0 / (0.05 * h)),
              head_bias=np.zeros(1), name="persistence-test", feature_names=["value"])
    m.scaler_mean[:] = 500.0
    m.scaler_scale[:] = 300.0
    m.save(path)
    return path


def scenario(n_streams: int = 24, length: int = 150, seed: int = 3):
    """(stream_ids, ts, values) of a spiky fleet in global time order."""
    f = spiky_fleet(n_streams=n_streams, length=length, seed=seed, spike_rate=0.02)
    return [str(s) for s in f.stream_ids], np.asarray(f.timestamps, np.int64), np.asarray(f.values, np.float64)


def reference_alerts(model_path: Path, events, tmp: Path) -> list[Alert]:
    """What ``streamrnn replay`` raises on the same events (Parquet in, alert records out)."""
    from streamrnn.replay import replay
    from streamrnn.scoring import ScoringConfig

    ids, ts, x = events
    src = tmp / f"events-{uuid.uuid4().hex[:6]}.parquet"
    pq.write_table(pa.table({"stream": ids, "ts": pa.array(ts, pa.timestamp("ms", tz="UTC")), "value": x[:, 0]}), src)
    return replay(src, model_path, config=ScoringConfig.from_dict(SCORING), progress=False).alerts


def alert_set(alerts) -> set[tuple[str, str]]:
    return {(a.alert_id, a.kind) for a in alerts}


def alert_records(alerts) -> dict[tuple[str, str], bytes]:
    from streamrnn.alerts import encode_alert

    return {(a.alert_id, a.kind): encode_alert(a) for a in alerts}


def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        fut.result(10)


def confluent_produce(bootstrap: str, topic: str, messages) -> list[tuple[int, int]]:
    """Produce ``(key, value)`` pairs with librdkafka; the (partition, offset) of each, from
    its delivery report."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": False})
    out: list = [None] * len(messages)
    errors = []

    def report(i):
        def cb(err, msg):
            if err is not None:
                errors.append(err)
            else:
                out[i] = (msg.partition(), msg.offset())
        return cb

    for i, (key, value) in enumerate(messages):
        while True:
            try:
                p.produce(topic, key=key, value=value, on_delivery=report(i))
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    assert p.flush(30) == 0 and not errors, errors
    return out


def event_messages(events, start: int = 0, stop: int | None = None) -> list[tuple[bytes, bytes]]:
    """Single-event JSON messages keyed by stream id."""
    ids, ts, x = events
    stop = len(ids) if stop is None else stop
    return [(ids[i].encode(), json.dumps({"stream": ids[i], "ts": int(ts[i]), "value": float(x[i, 0])}).encode())
            for i in range(start, stop)]


def read_topic(bootstrap: str, topic: str, expect: int | None = None, timeout: float = 20.0):
    """Every record of ``topic`` read with librdkafka: (key, value, headers, partition, offset).
    Reads until ``expect`` records arrived (or the end of every partition when None)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("reader"), "enable.auto.commit": False})
    try:
        meta = c.list_topics(topic, timeout=10)
        parts = sorted(meta.topics[topic].partitions)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out = []
        deadline = time.monotonic() + timeout
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            msg = c.poll(0.2)
            if msg is None:
                if expect is None and time.monotonic() - idle_since > 1.5:
                    break
                continue
            if msg.error():
                continue
            idle_since = time.monotonic()
            out.append((msg.key(), msg.value(), dict(msg.headers() or []), msg.partition(), msg.offset()))
            if expect is not None and len(out) >= expect:
                break
        return out
    finally:
        c.close()


def read_alerts(bootstrap: str, topic: str) -> list[Alert]:
    return [decode_alert(v) for _, v, *_ in read_topic(bootstrap, topic)]


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets (-1: none), asked through librdkafka."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in got}
    finally:
        c.close()


def end_offsets(reports: list[tuple[int, int]]) -> dict[int, int]:
    """Next offset per partition after the acknowledged messages."""
    ends: dict[int, int] = {}
    for part, off in reports:
        ends[part] = max(ends.get(part, 0), off + 1)
    return ends


def wait_committed(bootstrap, group, topic, partitions, ends, timeout=60.0, procs=()) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        got = committed(bootstrap, group, topic, partitions)
        if all(got.get(p, -1) >= e for p, e in ends.items()):
            return got
        for p in procs:
            assert p.poll() is None, f"daemon exited early with {p.returncode}; see {p.log_path}"
        assert time.monotonic() < deadline, f"offsets not committed in time: {got} vs {ends}"
        time.sleep(0.3)


def daemon_process(bootstrap: str, *, topic: str, alerts: str, model: Path, group: str, state_dir: Path,
                   log_path: Path, settings: dict | None = None) -> subprocess.Popen:
    """``python -m daemon`` as a child process; its JSON logs go to ``log_path``."""
    opts = {**FAST_GROUP, "checkpoint_interval_ms": 200, **(settings or {})}
    cmd = [sys.executable, "-m", "daemon", "--bootstrap", bootstrap, "--input", topic, "--alerts", alerts,
           "--model", str(model), "--group", group, "--state-dir", str(state_dir),
           "--config", str(_scoring_toml(state_dir.parent))]
    for k, v in opts.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))}
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    proc.log_path = log_path
    return proc


def _scoring_toml(directory: Path) -> Path:
    path = directory / "scoring.toml"
    path.write_text("[scoring]\n" + "".join(f"{k} = {v}\n" for k, v in SCORING.items()))
    return path


def log_lines(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def wait_log(path: Path, msg: str, proc: subprocess.Popen, timeout: float = 120.0, count: int = 1) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [r for r in log_lines(path) if r.get("msg") == msg]
        if len(hits) >= count:
            return hits[-1]
        assert proc.poll() is None, f"daemon exited with {proc.returncode}; see {path}"
        time.sleep(0.1)
    raise AssertionError(f"no {msg!r} log line from the daemon within {timeout} s; see {path}")


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout)
