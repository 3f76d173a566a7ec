"""The daemon as a process (``python -m daemon``) against the real broker: SIGTERM, SIGKILL at
random points with restarts, and two daemons in one group with a changelog takeover."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.daemon_support import (ROOT, alert_records, committed, confluent_produce, create_topic, daemon_process,
                                  end_offsets, event_messages, log_lines, persistence_model, read_alerts,
                                  reference_alerts, scenario, stop, unique, wait_committed, wait_log)

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def kafka_broker():
    """A broker of this module's own: clients killed with SIGKILL leave it half-open
    connections, which must not affect other modules' tests."""
    from daemon.broker import start_broker

    with start_broker() as broker:
        yield broker


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return persistence_model(tmp_path_factory.mktemp("model") / "persistence.safetensors")


@pytest.fixture(scope="module")
def events():
    return scenario(n_streams=30, length=160, seed=11)


@pytest.fixture(scope="module")
def reference(model_path, events, tmp_path_factory):
    alerts = reference_alerts(model_path, events, tmp_path_factory.mktemp("replay"))
    assert sum(a.kind == "open" for a in alerts) >= 3
    return alert_records(alerts)


def _stopped_counts(log_path):
    return [r["counts"] for r in log_lines(log_path) if r.get("msg") == "stopped"][-1]


def test_sigterm_while_compiling_on_a_cold_cache_exits_at_once(model_path, tmp_path, monkeypatch):
    # On a cold Numba cache the daemon logged only "starting" for a minute or more, and a
    # SIGTERM then waited out the grace period and exited 1. No broker: it never connects.
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cold-cache"))
    proc = daemon_process("127.0.0.1:1", topic="in", alerts="alerts", model=model_path, group="g",
                          state_dir=tmp_path / "state", log_path=tmp_path / "d.log", settings={"grace_period_s": 90})
    try:
        deadline = time.monotonic() + 120
        while not any(r.get("msg", "").startswith("compiling the kernels") for r in log_lines(tmp_path / "d.log")):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "d.log").read_text()
            time.sleep(0.1)
        t0 = time.monotonic()
        # The old code waited out the grace period (90 s), then exited 1. The bound is loose: the
        # handler runs once the compiler is back in Python, which under load can take seconds.
        assert stop(proc, timeout=60) == 0
        assert time.monotonic() - t0 < 45
    finally:
        if proc.poll() is None:
            proc.kill()
    msgs = [r.get("msg") for r in log_lines(tmp_path / "d.log")]
    assert "stopped while starting: nothing to checkpoint" in msgs and "kernels ready" not in msgs


def test_sigterm_exits_zero_within_grace_with_offsets_committed(kafka_broker, model_path, events, tmp_path):
    topic, alerts, group = unique("in"), unique("alerts"), unique("g")
    create_topic(kafka_broker.bootstrap, topic, 2)
    reports = confluent_produce(kafka_broker.bootstrap, topic, event_messages(events))
    grace = 8.0
    # A long checkpoint interval: only the shutdown checkpoint commits what was processed.
    proc = daemon_process(kafka_broker.bootstrap, topic=topic, alerts=alerts, model=model_path, group=group,
                          state_dir=tmp_path / "state", log_path=tmp_path / "d.log",
                          settings={"grace_period_s": grace, "checkpoint_interval_ms": 600000,
                                    "checkpoint_events": 10**9, "batch_max_events": 200})
    wait_log(tmp_path / "d.log", "partitions assigned", proc)
    time.sleep(0.3)
    t0 = time.monotonic()
    assert stop(proc, signal.SIGTERM, timeout=grace + 5) == 0
    assert time.monotonic() - t0 < grace
    counts = _stopped_counts(tmp_path / "d.log")
    offsets = committed(kafka_broker.bootstrap, group, topic, 2)
    assert counts["consumed"] > 0
    assert sum(max(o, 0) for o in offsets.values()) == counts["consumed"]  # all it processed, committed
    assert all(offsets[p] <= e for p, e in end_offsets(reports).items())


def test_sigkill_at_random_points_and_restart_gives_uninterrupted_alerts(kafka_broker, model_path, events,
                                                                        reference, tmp_path):
    topic, alerts, group = unique("in"), unique("alerts"), unique("g")
    create_topic(kafka_broker.bootstrap, topic, 2)
    msgs = event_messages(events)
    rng = random.Random(5)
    waves = [0, len(msgs) // 4, len(msgs) // 2, 3 * len(msgs) // 4, len(msgs)]
    reports = []
    log = tmp_path / "d.log"
    settings = {"batch_max_events": 50, "checkpoint_interval_ms": 150}
    for k in range(3):  # produce a wave, let the daemon work on it, kill it at a random moment
        reports += confluent_produce(kafka_broker.bootstrap, topic, msgs[waves[k]:waves[k + 1]])
        proc = daemon_process(kafka_broker.bootstrap, topic=topic, alerts=alerts, model=model_path, group=group,
                              state_dir=tmp_path / "state", log_path=log, settings=settings)
        wait_log(log, "partitions assigned", proc, count=k + 1)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    reports += confluent_produce(kafka_broker.bootstrap, topic, msgs[waves[3]:])
    proc = daemon_process(kafka_broker.bootstrap, topic=topic, alerts=alerts, model=model_path, group=group,
                          state_dir=tmp_path / "state", log_path=log, settings=settings)
    ends = end_offsets(reports)
    got = wait_committed(kafka_broker.bootstrap, group, topic, 2, ends, procs=[proc])
    assert stop(proc) == 0
    assert got == ends  # no input offset left unprocessed
    assert alert_records(read_alerts(kafka_broker.bootstrap, alerts)) == reference  # duplicates removed


def test_two_daemons_split_partitions_and_survivor_takes_over_from_changelog(kafka_broker, model_path, events,
                                                                            reference, tmp_path):
    topic, alerts, group = unique("in"), unique("alerts"), unique("g")
    create_topic(kafka_broker.bootstrap, topic, 4)
    msgs = event_messages(events)
    half = len(msgs) // 2
    settings = {"state_store": "changelog"}
    a = daemon_process(kafka_broker.bootstrap, topic=topic, alerts=alerts, model=model_path, group=group,
                       state_dir=tmp_path / "a", log_path=tmp_path / "a.log", settings=settings)
    b = daemon_process(kafka_broker.bootstrap, topic=topic, alerts=alerts, model=model_path, group=group,
                       state_dir=tmp_path / "b", log_path=tmp_path / "b.log", settings=settings)
    try:
        reports = confluent_produce(kafka_broker.bootstrap, topic, msgs[:half])
        wait_committed(kafka_broker.bootstrap, group, topic, 4, end_offsets(reports), procs=[a, b])
        owned = {}
        for name in ("a", "b"):
            assigned = [r for r in log_lines(tmp_path / f"{name}.log") if r.get("msg") == "partitions assigned"]
            owned[name] = set(assigned[-1]["partitions"])
        assert owned["a"] and owned["b"] and not owned["a"] & owned["b"]  # the group split the partitions
        assert len(owned["a"] | owned["b"]) == 4
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        reports += confluent_produce(kafka_broker.bootstrap, topic, msgs[half:])
        ends = end_offsets(reports)
        assert wait_committed(kafka_broker.bootstrap, group, topic, 4, ends, timeout=90, procs=[b]) == ends
        assert stop(b) == 0
        restored = [r for r in log_lines(tmp_path / "b.log") if r.get("msg") == "restored partition from changelog"
                    and f"{r['topic']}[{r['partition']}]" in owned["a"]]
        assert restored and all(r["streams"] > 0 for r in restored)
        assert alert_records(read_alerts(kafka_broker.bootstrap, alerts)) == reference
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("store", ["local", "changelog"])
def test_no_kernel_is_compiled_or_loaded_after_the_warm_up(kafka_broker, tmp_path, store):
    """Issue 5: kernels compiled at start-up, before the first event. A kernel loaded later
    holds the GIL for milliseconds mid-stream (a poll of 5000 ids took another encoding path
    than the warm-up's; the first checkpoint loaded the snapshot's id kernels)."""
    out = subprocess.run([sys.executable, "-m", "tests.late_compile_probe", kafka_broker.bootstrap, store,
                          str(tmp_path / "state")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["counts"]["consumed"] == 6600 and report["counts"]["checkpoints"] >= 2
    assert report["late"] == []
