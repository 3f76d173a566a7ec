"""streamrnn.replay: SCORES and alert files, independence from file split and batch size,
agreement with the Detector run directly, errors, and producing to Kafka."""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from streamrnn.alerts import alerts_from_arrow
from streamrnn.data import DataError, Schema
from streamrnn.detector import Detector
from streamrnn.model import Model
from streamrnn.replay import ReplayError, replay, replay_to_kafka

S, T = 12, 150


def events():
    """S streams of T events, one second apart, with an offset per stream and a few spikes
    (so alerts open and close); returned in time order."""
    rng = np.random.default_rng(5)
    ids = np.repeat([f"host-{i:02d}" for i in range(S)], T)
    ts = np.tile(1_700_000_000_000 + np.arange(T, dtype=np.int64) * 1000, S) + np.repeat(np.arange(S) * 7, T)
    x = np.sin(np.tile(np.arange(T), S) / 8.0) + 0.1 * rng.standard_normal(S * T)
    x[rng.choice(S * T, 25, replace=False)] += 8.0
    x[17] = np.nan  # a missing value
    order = np.lexsort((ids, ts))
    return ids[order], ts[order], x[order]


def model():
    return Model.random("gru", n_features=1, hidden=[8], seed=3, feature_names=["cpu"])


def write(path, ids, ts, x, fmt="parquet"):
    table = pa.table({"stream": ids, "ts": pa.array(ts).cast(pa.timestamp("ms", tz="UTC")), "cpu": x})
    (pq.write_table if fmt == "parquet" else pacsv.write_csv)(table, path)


def assert_same_table(a: pa.Table, b: pa.Table) -> None:
    """Equal schema and values, NaN equal to NaN (Arrow's equals treats NaN as unequal)."""
    assert a.schema == b.schema and a.num_rows == b.num_rows
    for name in a.column_names:
        x, y = a.column(name).to_numpy(), b.column(name).to_numpy()
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    d = tmp_path_factory.mktemp("whole")
    ids, ts, x = events()
    write(d / "all.parquet", ids, ts, x)
    res = replay(d / "all.parquet", model(), d / "scores.parquet", d / "alerts.parquet",
                 batch_rows=256, progress=False)
    return d, res


def test_scores_have_one_row_per_event_and_match_the_detector(whole):
    d, res = whole
    got = pq.read_table(d / "scores.parquet")
    assert got.column_names == ["stream", "ts", "cpu", "pred_cpu", "score", "alert"]
    assert got.num_rows == S * T == res.n_events
    ids, ts, x = events()
    direct = Detector(model()).process(list(ids), x[:, None], ts)  # one call, no files
    assert got.column("stream").to_pylist() == list(ids)
    assert np.array_equal(got.column("ts").cast(pa.int64()).to_numpy(), ts)
    np.testing.assert_array_equal(got.column("cpu").to_numpy(), x)
    np.testing.assert_array_equal(got.column("pred_cpu").to_numpy(), direct.prediction[:, 0])
    np.testing.assert_array_equal(got.column("score").to_numpy(), direct.score)
    np.testing.assert_array_equal(got.column("alert").to_numpy(), direct.alert)
    assert res.alerts == direct.alerts and res.n_alerts >= 1
    assert res.counters["events"] == S * T and res.counters["missing"] == 1
    assert res.n_streams == S


def test_alert_records_file_round_trips(whole):
    d, res = whole
    assert alerts_from_arrow(pq.read_table(d / "alerts.parquet")) == res.alerts
    opened = [a for a in res.alerts if a.kind == "open"]
    assert all(a.alert_id == f"{a.stream}:{a.ts}" for a in opened)


def test_output_is_identical_however_the_input_is_split(whole, tmp_path):
    d, res = whole
    ids, ts, x = events()
    # Three files: by stream group, rows shuffled inside each, one of them CSV.
    rng = np.random.default_rng(0)
    group = np.array([int(s[-2:]) % 3 for s in ids])
    for g in range(3):
        idx = rng.permutation(np.flatnonzero(group == g))
        write(tmp_path / f"part{g}.{'csv' if g == 2 else 'parquet'}", ids[idx], ts[idx], x[idx],
              "csv" if g == 2 else "parquet")
    files = [tmp_path / "part0.parquet", tmp_path / "part1.parquet", tmp_path / "part2.csv"]
    for batch_rows in (97, 256, 5000):
        split = replay(files, model(), tmp_path / f"s{batch_rows}.parquet", progress=False, batch_rows=batch_rows)
        assert_same_table(pq.read_table(tmp_path / f"s{batch_rows}.parquet"), pq.read_table(d / "scores.parquet"))
        assert split.alerts == res.alerts


def test_rows_sharing_stream_and_time_are_one_event_as_in_train(tmp_path):
    """Train merges rows of one stream and timestamp into their mean; replay scores the same
    merged event, once, and its summary says how many rows it merged and dropped."""
    from streamrnn.data import load_history, open_source
    from streamrnn.replay import summary_lines

    ids, ts, x = events()
    extra = np.flatnonzero(ids == "host-03")[[10, 40, 40]]  # a conflict, and a conflict plus a duplicate
    shifted = x[extra] + np.array([1.0, 2.0, 2.0])
    write(tmp_path / "in.parquet", np.concatenate([ids, ids[extra]]), np.concatenate([ts, ts[extra]]),
          np.concatenate([x, shifted]))
    res = replay(tmp_path / "in.parquet", model(), tmp_path / "s.parquet", progress=False, batch_rows=256)
    assert res.n_events == S * T and res.counters["events"] == S * T
    assert (res.counters["conflicts_merged"], res.counters["duplicates_dropped"]) == (2, 1)
    got = pq.read_table(tmp_path / "s.parquet")
    host = np.flatnonzero(np.array(got.column("stream").to_pylist()) == "host-03")
    trained = load_history(open_source(tmp_path / "in.parquet"), missing="zero")
    seq = trained.values[trained.streams.index("host-03")][:, 0]
    np.testing.assert_array_equal(got.column("cpu").to_numpy()[host], seq)
    np.testing.assert_array_equal(seq[[10, 40]], x[extra[:2]] + np.array([0.5, 1.0]))
    assert trained.stats["conflicts_merged"] == 2 and trained.stats["duplicates_dropped"] == 1
    lines = summary_lines(res)
    assert any("1 exact duplicate rows dropped" in ln and "2 rows merged into another of their stream and "
               "timestamp (mean kept)" in ln for ln in lines), lines


def test_a_damaged_page_in_a_file_replay_wrote_is_one_error_naming_it(whole, tmp_path):
    import shutil

    from streamrnn.evaluate import EvaluationError, evaluate_files
    from streamrnn.plot import plot_scores
    from tests.test_data import flip_bytes_in_last_data_page

    d, res = whole
    for name, column in (("scores.parquet", "cpu"), ("alerts.parquet", "score")):
        shutil.copy(d / name, tmp_path / name)
        flip_bytes_in_last_data_page(tmp_path / name, column)
    pq.write_table(pa.table({"stream": ["host-00"], "ts": [1_700_000_000_000]}), tmp_path / "labels.parquet")
    damaged = "is damaged: a Parquet page fails its checksum"
    with pytest.raises(EvaluationError, match=f"scores.parquet {damaged}"):
        evaluate_files(tmp_path / "scores.parquet", tmp_path / "labels.parquet")
    with pytest.raises(DataError, match=f"scores.parquet {damaged}"):
        plot_scores(tmp_path / "scores.parquet", tmp_path / "png")
    with pytest.raises(DataError, match=f"scores.parquet {damaged}"):  # a SCORES file replayed as input
        replay(tmp_path / "scores.parquet", model(), progress=False)
    with pytest.raises(DataError, match=f"alerts.parquet {damaged}"):
        from streamrnn.data import read_parquet
        read_parquet(tmp_path / "alerts.parquet")
    from typer.testing import CliRunner

    from streamrnn.cli import app

    model().save(tmp_path / "m.safetensors")
    for args in (["evaluate", tmp_path / "scores.parquet", "--labels", tmp_path / "labels.parquet"],
                 ["replay", tmp_path / "scores.parquet", "--model", tmp_path / "m.safetensors", "--out",
                  tmp_path / "again.parquet", "--no-progress"]):
        r = CliRunner().invoke(app, [str(a) for a in args])
        out = " ".join(r.output.split())
        assert r.exit_code == 2 and out.startswith("error: ") and damaged in out, r.output
        assert not (tmp_path / "again.parquet").exists()


@pytest.mark.broker
def test_to_kafka_sends_same_time_rows_as_one_event_and_says_so(tmp_path, kafka_broker):
    from typer.testing import CliRunner

    from streamrnn.cli import app

    ids, ts, x = events()
    extra = np.flatnonzero(ids == "host-05")[[3, 9, 9]]
    write(tmp_path / "in.parquet", np.concatenate([ids, ids[extra]]), np.concatenate([ts, ts[extra]]),
          np.concatenate([x, x[extra] + np.array([1.0, 2.0, 2.0])]))
    model().save(tmp_path / "m.safetensors")
    r = CliRunner().invoke(app, ["replay", str(tmp_path / "in.parquet"), "--model", str(tmp_path / "m.safetensors"),
                                 "--to-kafka", kafka_broker.bootstrap, "--topic", "merged-rows", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"produced {S * T:,} events" in r.output
    assert (f"data: {S * T + 3:,} rows read; 1 exact duplicate rows dropped; 2 rows merged into another of "
            "their stream and timestamp (mean kept)") in r.output, r.output


def test_feature_mapping_and_user_errors(tmp_path):
    ids, ts, x = events()
    pq.write_table(pa.table({"stream": ids, "ts": ts, "load": x}), tmp_path / "in.parquet")
    with pytest.raises(DataError, match="'cpu' not found"):
        replay(tmp_path / "in.parquet", model(), tmp_path / "out.parquet", progress=False)
    assert not list(tmp_path.glob("out.parquet*"))  # nothing half-written
    with pytest.raises(ReplayError, match="takes 1 features"):
        replay(tmp_path / "in.parquet", model(), progress=False, schema=Schema(features=("load", "ts2")))
    mapped = replay(tmp_path / "in.parquet", model(), tmp_path / "out.parquet", progress=False,
                    schema=Schema(features=("load",)))
    assert mapped.n_events == S * T
    assert "pred_load" in pq.read_table(tmp_path / "out.parquet").column_names
    with pytest.raises(DataError, match="no such file"):
        replay(tmp_path / "missing.parquet", model(), progress=False)


@pytest.mark.broker
def test_to_kafka_produces_every_event_keyed_by_stream(tmp_path):
    from confluent_kafka import Consumer

    from daemon.broker import start_broker

    ids, ts, x = events()
    write(tmp_path / "in.parquet", ids, ts, x)
    with start_broker() as broker:
        sent = replay_to_kafka(tmp_path / "in.parquet", broker.bootstrap, "replayed", model=model(),
                               progress=False)
        assert sent.events == S * T
        consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "check",
                             "auto.offset.reset": "earliest", "enable.auto.commit": False,
                             "session.timeout.ms": 6000, "max.poll.interval.ms": 6000})
        consumer.subscribe(["replayed"])
        got, deadline = [], time.monotonic() + 60
        while len(got) < S * T and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append((msg.key().decode(), json.loads(msg.value())))
        consumer.close()
    assert len(got) == S * T
    assert all(k == ev["stream"] for k, ev in got)
    by_stream = {}
    for k, ev in got:
        by_stream.setdefault(k, []).append(ev)
    for s in set(ids):
        mine = ids == s
        assert [e["ts"] for e in by_stream[s]] == ts[mine].tolist()  # each stream in time order
        want = [None if np.isnan(v) else v for v in x[mine]]
        assert [e["cpu"] if "cpu" in e else e.get("value") for e in by_stream[s]] == want


def test_cli_replay_evaluate_plot(whole, tmp_path):
    from typer.testing import CliRunner

    from streamrnn.cli import app

    d, res = whole
    model().save(tmp_path / "m.safetensors")
    runner = CliRunner()
    r = runner.invoke(app, ["replay", str(d / "all.parquet"), "--model", str(tmp_path / "m.safetensors"),
                            "--out", str(tmp_path / "s.parquet"), "--alerts-out", str(tmp_path / "a.parquet"),
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"events {S * T:,}" in r.output and f"alert episodes {res.n_alerts}" in r.output
    assert_same_table(pq.read_table(tmp_path / "s.parquet"), pq.read_table(d / "scores.parquet"))
    opened = [a for a in res.alerts if a.kind == "open"]
    pq.write_table(pa.table({"stream": [a.stream for a in opened], "ts": [a.ts for a in opened]}),
                   tmp_path / "labels.parquet")
    r = runner.invoke(app, ["evaluate", str(tmp_path / "s.parquet"), "--labels", str(tmp_path / "labels.parquet"),
                            "--probation", "0", "--json", str(tmp_path / "ev.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ev.json").read_text())["event"]["recall"] == 1.0
    r = runner.invoke(app, ["plot", str(tmp_path / "s.parquet"), "--out-dir", str(tmp_path / "png"), "--limit", "2"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "png").glob("*.png"))) == 3
    # User mistakes: one message, exit code 2, no traceback.
    for args in (["replay", str(d / "all.parquet"), "--out", str(tmp_path / "x.parquet")],
                 ["replay", str(tmp_path / "nope.parquet"), "--model", str(tmp_path / "m.safetensors"),
                  "--out", str(tmp_path / "x.parquet")],
                 ["evaluate", str(tmp_path / "s.parquet"), "--labels", str(tmp_path / "nope.csv")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output, r.output


def test_time_delta_model_replays_a_file_without_dt_with_the_inputs_training_had(tmp_path):
    from streamrnn.data import load_history, open_source
    from streamrnn.train import train

    # Four streams, irregular steps and a gap over max_gap_ms in each (training splits there).
    rng = np.random.default_rng(8)
    gap = 30_000
    rows = []
    for i in range(4):
        steps = rng.integers(500, 4000, 120)
        steps[40 + 10 * i] = gap + 1 + 1000 * i
        t = 1_700_000_000_000 + np.cumsum(steps)
        rows.append((np.full(len(t), f"dev-{i}"), t, np.sin(t / 9000.0 + i) + 0.05 * rng.standard_normal(len(t))))
    ids, ts, x = (np.concatenate(c) for c in zip(*rows))
    order = np.argsort(ts, kind="stable")
    src = tmp_path / "history.parquet"
    write(src, ids[order], ts[order], x[order])  # stream, ts, cpu: no dt column
    trained = train([src], tmp_path / "td.safetensors", cell="gru", hidden=[4], window=8, stride=4, epochs=1,
                    time_delta=True, max_gap_ms=gap, progress=False)
    model = trained.model
    assert model.feature_names == ["cpu", "dt"] and not any("dt" in w for w in trained.warnings)

    seen = []
    res = replay(src, tmp_path / "td.safetensors", tmp_path / "scores.parquet", batch_rows=53, progress=False,
                 on_batch=lambda b, r: seen.append((list(b.stream_ids), r.values.copy())))
    assert res.n_events == len(ids) and res.counters["gap_resets"] == 4
    got_ids = np.concatenate([s for s, _ in seen])
    got = np.concatenate([v for _, v in seen])
    history = load_history(open_source([src]), max_gap_ms=gap, time_delta_feature=True)
    assert history.stats["gaps_split"] == 4
    for sid in sorted(set(history.streams)):
        want = np.concatenate([v for s, v in zip(history.streams, history.values) if s == sid])
        assert np.array_equal(got[got_ids == sid], want), sid  # cpu and dt, bit for bit
    # The scores file holds the input's columns; a file that still has a dt column scores the same.
    scores = pq.read_table(tmp_path / "scores.parquet")
    assert "cpu" in scores.column_names and "dt" not in scores.column_names
    pq.write_table(pq.read_table(src).append_column("dt", pa.array(np.full(len(ids), 99.0))), tmp_path / "old.parquet")
    again = replay(tmp_path / "old.parquet", model, tmp_path / "again.parquet", schema=Schema(features=("cpu", "dt")),
                   progress=False)
    assert again.n_events == len(ids)
    assert_same_table(pq.read_table(tmp_path / "again.parquet"), scores)


class _CompilesOnce(Detector):
    """A Detector whose first batch spends ``pause`` seconds inside a Numba compile event, as
    a cold cache's first call does."""

    pause = 0.4

    def process(self, *args, **kwargs):
        if not getattr(self, "_compiled", False):
            from numba.core import event

            self._compiled = True
            with event.trigger_event("numba:compile"):
                time.sleep(self.pause)
        return super().process(*args, **kwargs)


def test_rate_and_summary_leave_out_kernel_compiling(whole):
    # On a cold cache replay printed rates like 14 events/s: the minutes of compiling counted.
    from streamrnn.replay import summary_lines

    d, _ = whole
    res = replay(d / "all.parquet", model(), batch_rows=256, progress=False, detector=_CompilesOnce(model()))
    assert _CompilesOnce.pause <= res.compile_seconds < res.seconds
    assert res.events_per_second == pytest.approx(res.n_events / (res.seconds - res.compile_seconds))
    assert "compiling kernels, first run only" in summary_lines(res)[0]
    warm = replay(d / "all.parquet", model(), batch_rows=256, progress=False)  # kernels compiled by now
    assert warm.compile_seconds < 0.05 and "compiling" not in summary_lines(warm)[0]
