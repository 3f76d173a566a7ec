"""The daemon against the real development broker, in process: end to end against replay,
an independent client, dead letters, the changelog store, Arrow and array messages."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request

import msgspec
import numpy as np
import pytest

from daemon.checkpoint import SPEC_KEY_PREFIX
from daemon.codec import encode_events
from daemon.config import load_config
from daemon.loop import DLQ_HEADERS, Daemon
from daemon.producer import produce_events
from streamrnn.detector import Detector
from streamrnn.model import Model
from streamrnn.scoring import ScoringConfig
from tests.daemon_support import (FAST_GROUP, SCORING, alert_records, confluent_produce, create_topic,
                                  event_messages, persistence_model, read_alerts, read_topic,
                                  reference_alerts, scenario, unique)

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return persistence_model(tmp_path_factory.mktemp("model") / "persistence.safetensors")


@pytest.fixture(scope="module")
def events():
    return scenario()


@pytest.fixture(scope="module")
def reference(model_path, events, tmp_path_factory):
    alerts = reference_alerts(model_path, events, tmp_path_factory.mktemp("replay"))
    assert sum(a.kind == "open" for a in alerts) >= 3, "the scenario must raise alerts to be a test"
    return alert_records(alerts)


class Running:
    """A daemon in a thread of this process."""

    def __init__(self, bootstrap, model_path, tmp_path, *, topic, alerts, group=None, **settings):
        self.cfg = load_config(overrides=dict(
            bootstrap=bootstrap, input=topic, alerts=alerts, model=str(model_path), group=group or unique("g"),
            state_dir=str(tmp_path / "state"), checkpoint_interval_ms=200, **FAST_GROUP, **settings))
        self.cfg.scoring = dict(SCORING)
        self.daemon = Daemon(self.cfg)
        self.code = None
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.code = self.daemon.run(install_signals=False)
        except BaseException as exc:  # surfaced by wait/stop
            self.error = exc

    def wait_consumed(self, n, timeout=60.0):
        deadline = time.monotonic() + timeout
        while self.daemon.counts["consumed"] < n:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"consumed {self.daemon.counts['consumed']} of {n}"
            time.sleep(0.1)

    def stop(self):
        self.daemon.stop()
        self.thread.join(30)
        assert self.error is None, self.error
        assert self.code == 0
        return self.daemon.counts


@pytest.mark.parametrize("producer_client", ["kafka-python", "confluent-kafka"])
def test_daemon_on_json_batches_and_arrow_raises_exactly_replays_alerts(kafka_broker, model_path, events,
                                                                        reference, tmp_path, producer_client):
    topic, alerts = unique("in"), unique("alerts")
    create_topic(kafka_broker.bootstrap, topic, 3)
    ids, ts, x = events
    half = len(ids) // 2
    # First half as JSON arrays of up to 4 events of one stream, second half as Arrow batches.
    a = produce_events(kafka_broker.bootstrap, topic, [(ids[:half], ts[:half], x[:half])], events_per_message=4)
    b = produce_events(kafka_broker.bootstrap, topic, [(ids[half:], ts[half:], x[half:])], events_per_message=8,
                       arrow=True)
    switch = sys.getswitchinterval()  # before the daemon's thread starts: it sets its own at once
    run = Running(kafka_broker.bootstrap, model_path, tmp_path, topic=topic, alerts=alerts, metrics_port=-1,
                  producer_client=producer_client)
    run.wait_consumed(a.messages + b.messages)
    assert sys.getswitchinterval() == pytest.approx(run.cfg.switch_interval_ms / 1000)  # while it runs
    from daemon.fastrecords import FastPartitionRecords

    assert run.daemon.consumer._fetcher.PartitionRecords is FastPartitionRecords  # the records below went through it
    health = run.daemon.health
    base = f"http://127.0.0.1:{health.port}"
    assert urllib.request.urlopen(base + "/healthz").status == 200
    assert urllib.request.urlopen(base + "/readyz").status == 200
    metrics = urllib.request.urlopen(base + "/metrics").read().decode()
    counts = run.stop()
    assert sys.getswitchinterval() == switch  # the process's own again
    assert counts["events"] == len(ids) and counts["dead_lettered"] == 0
    got = read_alerts(kafka_broker.bootstrap, alerts)
    assert alert_records(got) == reference  # same ids, kinds, scores, values, predictions
    assert len(got) == len(reference)  # an uninterrupted run writes each record once
    assert f"streamrnn_events_total {float(len(ids))}" in metrics
    assert "streamrnn_batch_seconds_bucket" in metrics
    # The latency stages: a record age per partition batch; after the stop (everything flushed)
    # an acknowledgement time per burst of output records, and the scenario has alerts.
    assert "streamrnn_record_age_seconds_bucket" in metrics
    sample = run.daemon.metrics.registry.get_sample_value
    assert sample("streamrnn_record_age_seconds_count") >= 1
    assert sample("streamrnn_output_ack_seconds_count") >= 1
    assert sample("streamrnn_checkpoint_bytes_total", {"kind": "full"}) > 0  # the first checkpoint of a partition


@pytest.mark.parametrize("producer_client", ["kafka-python", "confluent-kafka"])
def test_dead_letters_keep_message_and_counts_add_up(kafka_broker, model_path, events, reference, tmp_path,
                                                     producer_client):
    topic, alerts = unique("in"), unique("alerts")
    create_topic(kafka_broker.bootstrap, topic, 2)
    good = event_messages(events)
    bad = [(b"s-bad", b"{not json"), (b"s-bad", b'{"stream": "s-bad", "ts": "yesterday", "value": 1}'),
           (b"s-bad", b'{"stream": "s-bad", "ts": 5}'), (b"s-bad", b""),
           (b"s-bad", b"\xff\xff\xff\xffnot arrow"), (None, b'{"ts": 5, "value": 1.0}'),
           (b"s-bad", encode_events(["a", "b"], [1, 2], [[1.0, 2.0], [3.0, 4.0]], ["cpu", "mem"], arrow=True))]
    # Interleave: a bad message after every 300 good ones, the rest at the end.
    messages, is_bad, pending = [], [], list(bad)
    for i, m in enumerate(good):
        messages.append(m)
        is_bad.append(False)
        if i % 300 == 150 and pending:
            messages.append(pending.pop(0))
            is_bad.append(True)
    messages += pending
    is_bad += [True] * len(pending)
    reports = confluent_produce(kafka_broker.bootstrap, topic, messages)
    run = Running(kafka_broker.bootstrap, model_path, tmp_path, topic=topic, alerts=alerts,
                  producer_client=producer_client)
    run.wait_consumed(len(messages))
    counts = run.stop()
    assert counts["consumed"] == len(messages) == counts["decoded"] + counts["dead_lettered"]
    assert counts["dead_lettered"] == len(bad)
    dlq = read_topic(kafka_broker.bootstrap, f"{topic}.dead-letter", expect=len(bad))
    sent = {reports[i]: messages[i] for i in range(len(messages)) if is_bad[i]}
    seen = {}
    for key, value, headers, _, _ in dlq:
        where = (int(headers[DLQ_HEADERS[2]]), int(headers[DLQ_HEADERS[3]]))
        assert headers[DLQ_HEADERS[1]].decode() == topic
        assert headers[DLQ_HEADERS[0]]  # a reason
        seen[where] = (key, value or b"")
    assert seen == {k: (key, value) for k, (key, value) in sent.items()}  # unchanged, with their origin
    assert alert_records(read_alerts(kafka_broker.bootstrap, alerts)) == reference  # the good ones scored


@pytest.mark.parametrize("producer_client", ["kafka-python", "confluent-kafka"])
def test_changelog_store_restores_partition_state_in_a_new_daemon(kafka_broker, model_path, events, reference,
                                                                  tmp_path, producer_client):
    topic, alerts, group = unique("in"), unique("alerts"), unique("g")
    create_topic(kafka_broker.bootstrap, topic, 2)
    msgs = event_messages(events)
    half = len(msgs) // 2
    confluent_produce(kafka_broker.bootstrap, topic, msgs[:half])
    first = Running(kafka_broker.bootstrap, model_path, tmp_path / "a", topic=topic, alerts=alerts, group=group,
                    state_store="changelog", producer_client=producer_client)
    first.wait_consumed(half)
    first.stop()
    confluent_produce(kafka_broker.bootstrap, topic, msgs[half:])
    # Another state dir: the state can only come from the changelog topic.
    second = Running(kafka_broker.bootstrap, model_path, tmp_path / "b", topic=topic, alerts=alerts, group=group,
                     state_store="changelog")
    second.wait_consumed(len(msgs) - half)
    counts = second.stop()
    assert counts["consumed"] == len(msgs) - half  # resumed at the committed offsets
    got = read_alerts(kafka_broker.bootstrap, alerts)
    assert alert_records(got) == reference
    changelog = read_topic(kafka_broker.bootstrap, f"{group}-state-changelog")
    rows = [k for k, *_ in changelog if not k.startswith(SPEC_KEY_PREFIX)]
    assert {k.decode() for k in rows} == set(events[0])  # one key per stream, besides the layout spec
    assert len({k for k, *_ in changelog} - set(rows)) == 1  # one model, one layout


def test_hot_reload_with_same_architecture_keeps_stream_state(kafka_broker, model_path, events, tmp_path):
    from streamrnn.model import Model

    topic, alerts = unique("in"), unique("alerts")
    create_topic(kafka_broker.bootstrap, topic, 1)
    path = tmp_path / "model.safetensors"
    path.write_bytes(model_path.read_bytes())
    confluent_produce(kafka_broker.bootstrap, topic, event_messages(events, 0, 200))
    run = Running(kafka_broker.bootstrap, path, tmp_path, topic=topic, alerts=alerts, model_reload_interval_s=0.2)
    run.wait_consumed(200)
    task = next(iter(run.daemon.tasks.values()))
    streams = len(task.detector.table)
    m = Model.load(path)
    m.name = "persistence-v2"
    m.save(path)
    deadline = time.monotonic() + 20
    while run.daemon.model.name != "persistence-v2":
        assert time.monotonic() < deadline, "model not reloaded"
        time.sleep(0.1)
    task = next(iter(run.daemon.tasks.values()))
    assert len(task.detector.table) == streams > 0
    assert task.detector.model.name == "persistence-v2"
    run.stop()


@pytest.mark.parametrize("producer_client", ["kafka-python", "confluent-kafka"])
def test_alert_records_are_keyed_by_stream_in_the_java_clients_partition(kafka_broker, model_path, events, tmp_path,
                                                                          producer_client):
    from kafka.partitioner.default import murmur2

    topic, alerts = unique("in"), unique("alerts")
    create_topic(kafka_broker.bootstrap, topic, 2)
    reports = confluent_produce(kafka_broker.bootstrap, topic, event_messages(events))
    run = Running(kafka_broker.bootstrap, model_path, tmp_path, topic=topic, alerts=alerts,
                  producer_client=producer_client)
    run.wait_consumed(len(reports))
    run.stop()
    recs = read_topic(kafka_broker.bootstrap, alerts)
    assert recs
    for key, value, _headers, partition, _offset in recs:
        assert key.decode() == msgspec.json.decode(value)["stream"]
        # The Java client's partitioner (murmur2, positive, modulo the 2 partitions)
        assert partition == (murmur2(key) & 0x7FFFFFFF) % 2


def test_backpressure_pauses_input_and_scores_topic_gets_every_event(kafka_broker, model_path, events, tmp_path):
    topic, alerts, scores = unique("in"), unique("alerts"), unique("scores")
    create_topic(kafka_broker.bootstrap, topic, 2)
    msgs = event_messages(events, 0, 1500)
    confluent_produce(kafka_broker.bootstrap, topic, msgs)
    # At most 100 unacknowledged output messages: the scores topic (one per event) keeps
    # the producer behind, so input is paused until it catches up. A long linger holds the
    # records of a poll unsent until the check: with linger_ms=1 the producer's I/O thread
    # had most of them acknowledged while the loop was still handing them over (1405 of
    # 1535 measured), so under load the check found fewer than 100 pending and never paused.
    run = Running(kafka_broker.bootstrap, model_path, tmp_path, topic=topic, alerts=alerts, scores=scores,
                  max_pending_messages=100, linger_ms=1000)
    run.wait_consumed(len(msgs))
    counts = run.stop()
    assert run.daemon.metrics.backpressure._value.get() > 0
    recs = read_topic(kafka_broker.bootstrap, scores, expect=len(msgs))
    assert len(recs) == counts["events"] == len(msgs)
    got = {(k.decode(), msgspec.json.decode(v)["ts"]) for k, v, *_ in recs}
    assert got == {(k.decode(), json.loads(v)["ts"]) for k, v in msgs}
    # Every record's score, alert flag and prediction are the detector's for that event (a
    # stream's events stay in order in its partition, so one detector over all is the reference).
    ids, ts, x = events
    ref = Detector(Model.load(model_path), config=ScoringConfig.from_dict(SCORING)).process(
        list(ids[:1500]), x[:1500], ts[:1500])
    want = {(ids[i], int(ts[i])): {"stream": ids[i], "ts": int(ts[i]),
                                   "score": float(ref.score[i]) if np.isfinite(ref.score[i]) else None,
                                   "alert": bool(ref.alert[i]),
                                   "predicted": {"value": float(ref.prediction[i, 0])
                                                 if np.isfinite(ref.prediction[i, 0]) else None}}
            for i in range(1500)}
    for k, v, *_ in recs:
        rec = msgspec.json.decode(v)
        assert rec == want[(k.decode(), rec["ts"])]


def _finite_or_none(v):
    """A float as the scores topic encodes it: non-finite (and missing) as null."""
    return v if v is not None and np.isfinite(v) else None


def test_a_retried_message_scores_as_replay_of_the_same_rows(kafka_broker, model_path, events, tmp_path):
    """A producer retry (the same event again under a new offset) is one event, as replay
    makes it: the daemon's alerts and scores equal replay's on the same rows, duplicates and all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from streamrnn.replay import replay

    topic, alerts, scores = unique("in"), unique("alerts"), unique("scores")
    create_topic(kafka_broker.bootstrap, topic, 2)
    retried = set(range(100, len(events[0]), 150))
    rows = [i for i in range(len(events[0])) for _ in range(2 if i in retried else 1)]  # the copy right after
    ids, ts, x = (np.asarray(events[0])[rows].tolist(), events[1][rows], events[2][rows])
    sent = event_messages((ids, ts, x))
    confluent_produce(kafka_broker.bootstrap, topic, sent)
    run = Running(kafka_broker.bootstrap, model_path, tmp_path, topic=topic, alerts=alerts, scores=scores)
    run.wait_consumed(len(sent))
    counts = run.stop()
    assert counts["events"] == len(sent) and counts["same_ts_dropped"] == len(retried)
    assert run.daemon.metrics.events_same_ts._value.get() == len(retried)

    src, out = tmp_path / "sent.parquet", tmp_path / "scores.parquet"
    pq.write_table(pa.table({"stream": ids, "ts": pa.array(ts, pa.timestamp("ms", tz="UTC")), "value": x[:, 0]}), src)
    ref = replay(src, model_path, out, config=ScoringConfig.from_dict(SCORING), progress=False)
    assert ref.counters["duplicates_dropped"] == len(retried)
    assert alert_records(read_alerts(kafka_broker.bootstrap, alerts)) == alert_records(ref.alerts)
    table = pq.read_table(out)
    want = {}
    for sid, t, score, alert, pred in zip(table["stream"].to_pylist(), table["ts"].cast(pa.int64()).to_pylist(),
                                          table["score"].to_pylist(), table["alert"].to_pylist(),
                                          table["pred_value"].to_pylist()):
        want[(sid, t)] = {"stream": sid, "ts": t, "score": _finite_or_none(score), "alert": alert,
                          "predicted": {"value": _finite_or_none(pred)}}
    got = {}
    for _, v, *_ in read_topic(kafka_broker.bootstrap, scores):  # all of them, to the end
        rec = msgspec.json.decode(v)
        assert (rec["stream"], rec["ts"]) not in got, "one score per (stream, ts)"
        got[(rec["stream"], rec["ts"])] = rec
    assert got == want


def test_prefetch_puts_the_next_fetch_in_flight_with_the_pinned_client(kafka_broker, model_path, tmp_path):
    """kafka-python returns from a poll that waited for its records with no fetch in flight;
    the loop's prefetch (the fetcher's request handed to the I/O thread) sends one and returns
    no records."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    topic = unique("prefetch")
    create_topic(kafka_broker.bootstrap, topic, 1)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    producer.send(topic, key=b"s", value=b"{}").get(timeout=10)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=2000)
    try:
        consumer.assign([TopicPartition(topic, 0)])
        consumer.seek_to_beginning()
        batch = {}
        deadline = time.monotonic() + 20
        while not batch:
            assert time.monotonic() < deadline, "no record read back"
            batch = consumer.poll(timeout_ms=5000)
        assert not consumer._fetcher.in_flight_fetches()
        daemon = Daemon(load_config(overrides=dict(
            bootstrap=kafka_broker.bootstrap, input=topic, alerts=unique("alerts"), model=str(model_path),
            group=unique("g"), state_dir=str(tmp_path / "state"))))
        daemon.consumer = consumer
        before = {tp: list(records) for tp, records in batch.items()}
        daemon._prefetch(batch)
        # Handed to the consumer's I/O thread: in flight soon after, waiting in the broker
        # (nothing more to read).
        deadline = time.monotonic() + 5
        while not consumer._fetcher.in_flight_fetches():
            assert time.monotonic() < deadline, "the prefetch sent no fetch request"
            time.sleep(0.001)
        assert batch == before
    finally:
        consumer.close()


def test_time_delta_model_scores_events_without_dt_and_dead_letters_none(kafka_broker, tmp_path):
    # A model trained with --time-delta: its events carry 'value' only; the daemon derived
    # nothing before and dead-lettered every one of them.
    gap = 60_000
    model = Model.random("gru", n_features=2, hidden=[8], seed=9, feature_names=["value", "dt"],
                         training={"hyper_parameters": {"time_delta": True, "max_gap_ms": gap}})
    model.scaler_mean[:] = [0.0, 20.0]
    model.scaler_scale[:] = [1.0, 15.0]
    path = model.save(tmp_path / "td.safetensors")
    rng = np.random.default_rng(9)
    streams = []
    for i in range(6):
        steps = rng.integers(1000, 40_000, 40)
        steps[20] = gap + 5000  # a gap the detector restarts dt at
        t = 1_767_225_600_000 + np.cumsum(steps)
        streams.append((np.full(len(t), f"td-{i}"), t, np.sin(t / 50_000.0 + i)))
    ids, ts, x = (np.concatenate(c) for c in zip(*streams))
    order = np.argsort(ts, kind="stable")
    ids, ts, x = [str(s) for s in ids[order]], ts[order], x[order][:, None]
    topic, alerts, scores = unique("in"), unique("alerts"), unique("scores")
    create_topic(kafka_broker.bootstrap, topic, 2)
    third = len(ids) // 3
    parts = [(0, third, {}), (third, 2 * third, {"events_per_message": 4}),
             (2 * third, len(ids), {"events_per_message": 8, "arrow": True})]  # single JSON, arrays, Arrow
    sent = sum(produce_events(kafka_broker.bootstrap, topic, [(ids[a:b], ts[a:b], x[a:b])], **how).messages
               for a, b, how in parts)
    run = Running(kafka_broker.bootstrap, path, tmp_path, topic=topic, alerts=alerts, scores=scores)
    run.wait_consumed(sent)
    counts = run.stop()
    recs = read_topic(kafka_broker.bootstrap, scores, expect=len(ids))
    assert counts["dead_lettered"] == 0 and counts["events"] == len(ids) == len(recs)
    ref = Detector(Model.load(path), config=ScoringConfig.from_dict(SCORING)).process(ids, x, ts)
    assert ref.values[:, 1].max() > 0 and (ref.values[1:, 1] == 0).any()  # dt derived, 0 after the gaps
    assert np.isfinite(ref.score).sum() > len(ids) // 2

    def num(v):
        return float(v) if np.isfinite(v) else None

    want = {(ids[i], int(ts[i])): {"stream": ids[i], "ts": int(ts[i]), "score": num(ref.score[i]),
                                   "alert": bool(ref.alert[i]),
                                   "predicted": {"value": num(ref.prediction[i, 0]), "dt": num(ref.prediction[i, 1])}}
            for i in range(len(ids))}
    for k, v, *_ in recs:
        rec = msgspec.json.decode(v)
        assert rec == want[(k.decode(), rec["ts"])]
