"""User mistakes through the command line: one clear line, exit code 2, no traceback, and no
input file replaced or output left half-written."""

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from streamrnn.cli import app
from streamrnn.model import Model

S, T = 4, 60
T0 = 1_767_225_600_000

runner = CliRunner()


def invoke(*args) -> tuple[int, str]:
    """Exit code and output (whitespace collapsed: rich wraps long lines); fails on a traceback."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, re.sub(r"\s+", " ", result.output)


def fleet_table(n_streams: int = S, length: int = T) -> pa.Table:
    rng = np.random.default_rng(0)
    ids = np.repeat([f"s{i}" for i in range(n_streams)], length)
    step = np.tile(np.arange(length), n_streams)
    value = np.sin(step / 5.0) + np.repeat(np.arange(n_streams), length) + 0.05 * rng.standard_normal(len(step))
    return pa.table({"stream": ids, "ts": pa.array(T0 + step * 60_000).cast(pa.timestamp("ms", tz="UTC")),
                     "value": value})


@pytest.fixture
def data(tmp_path):
    pq.write_table(fleet_table(), tmp_path / "live.parquet")
    Model.random("gru", n_features=1, hidden=[8], seed=3, feature_names=["value"]).save(tmp_path / "m.safetensors")
    return tmp_path


def replay_args(d, *extra):
    return ["replay", d / "live.parquet", "--model", d / "m.safetensors", "--no-progress", *extra]


def test_error_messages_keep_their_brackets(data):
    # rich took "[scoring]" for a markup tag and printed "error:  threshold must ..."
    code, out = invoke(*replay_args(data, "--out", data / "s.parquet", "--threshold", "5"))
    assert code == 2 and "error: [scoring] threshold must be a score in [0, 1]; got 5.0" in out


def test_replay_output_that_is_a_directory_fails_before_scoring(data):
    (data / "dir").mkdir()
    code, out = invoke(*replay_args(data, "--out", data / "dir"))
    assert code == 2 and f"--out {data / 'dir'} is a directory" in out
    # --alerts-out is checked before the scores are written, not after the run
    code, out = invoke(*replay_args(data, "--out", data / "s.parquet", "--alerts-out", data / "dir"))
    assert code == 2 and "--alerts-out" in out and "is a directory" in out
    assert not (data / "s.parquet").exists() and not list(data.glob("*.partial"))


def test_replay_refuses_to_write_over_its_input(data):
    before = (data / "live.parquet").read_bytes()
    code, out = invoke(*replay_args(data, "--out", data / "live.parquet"))
    assert code == 2 and "is one of the input files" in out
    code, out = invoke(*replay_args(data, "--out", data / "s.parquet", "--alerts-out", data / "." / "live.parquet"))
    assert code == 2 and "--alerts-out" in out and "is one of the input files" in out
    assert (data / "live.parquet").read_bytes() == before


def test_replay_output_under_a_file(data):
    code, out = invoke(*replay_args(data, "--out", data / "live.parquet" / "s.parquet"))
    assert code == 2 and "is a file, not a directory" in out


def test_train_refuses_outputs_it_cannot_write_before_training(data):
    hist = data / "live.parquet"
    before = hist.read_bytes()
    base = ["train", hist, "--epochs", "1", "--window", "8", "--no-progress"]
    code, out = invoke(*base, "--out", hist)
    assert code == 2 and "--out" in out and "is one of the input files" in out
    assert hist.read_bytes() == before
    # the report (written after training) and the checkpoint (after the first epoch) are
    # checked before any work: a typo no longer costs the whole run and a traceback
    code, out = invoke(*base, "--out", data / "m2.safetensors", "--report", data / "nope" / "r.json")
    assert code == 2 and f"--report {data / 'nope' / 'r.json'}: directory" in out and "does not exist" in out
    code, out = invoke(*base, "--out", data / "m2.safetensors", "--checkpoint", data / "nope" / "c.npz")
    assert code == 2 and "--checkpoint" in out and "does not exist" in out
    code, out = invoke(*base, "--out", data / "m2.safetensors", "--report", data / "live.json")
    assert code == 0, out  # a report beside the data is fine
    code, out = invoke(*base, "--out", data / "m3.safetensors", "--report", data / "live.parquet")
    assert code == 2 and "--report" in out and "is one of the input files" in out
    assert not (data / "m3.safetensors").exists() and hist.read_bytes() == before


def test_plot_out_dir_that_is_a_file(data):
    code, _ = invoke(*replay_args(data, "--out", data / "s.parquet"))
    assert code == 0
    code, out = invoke("plot", data / "s.parquet", "--out-dir", data / "live.parquet")
    assert code == 2 and f"--out-dir {data / 'live.parquet'} is a file, not a directory" in out


def test_evaluate_json_path_errors_name_the_flag(data):
    code, _ = invoke(*replay_args(data, "--out", data / "s.parquet"))
    assert code == 0
    pq.write_table(pa.table({"stream": ["s1"], "ts": pa.array([T0 + 600_000]).cast(pa.timestamp("ms", tz="UTC"))}),
                   data / "labels.parquet")
    (data / "dir").mkdir()
    code, out = invoke("evaluate", data / "s.parquet", "--labels", data / "labels.parquet", "--json", data / "dir")
    assert code == 2 and "--json" in out and "is a directory" in out
    code, out = invoke("evaluate", data / "s.parquet", "--labels", data / "labels.parquet",
                       "--json", data / "nope" / "e.json")
    assert code == 2 and "--json" in out and "cannot write it" in out
    code, out = invoke("evaluate", data / "s.parquet", "--labels", data / "labels.parquet", "--json", data / "e.json")
    assert code == 0 and (data / "e.json").read_text().startswith("{") and not list(data.glob("*.partial"))


def test_text_column_without_the_stream_column_is_not_read_as_one_stream(data):
    # A fleet whose id column is called "host": read as one stream, every stream's events
    # were interleaved into one sequence (S streams -> 1, bogus alerts), silently.
    pq.write_table(fleet_table().rename_columns(["host", "ts", "value"]), data / "hosts.parquet")
    args = ["replay", data / "hosts.parquet", "--model", data / "m.safetensors", "--no-progress",
            "--out", data / "s.parquet"]
    code, out = invoke(*args)
    assert code == 2 and "no stream column 'stream', but text column(s) 'host'" in out
    assert "--stream-col host" in out and not (data / "s.parquet").exists()
    code, out = invoke(*args, "--stream-col", "host")
    assert code == 0 and f"streams {S} " in out
    code, out = invoke("train", data / "hosts.parquet", "--out", data / "m2.safetensors", "--no-progress")
    assert code == 2 and "--stream-col host" in out
    # a file of one stream (no text column) is still one stream
    pq.write_table(fleet_table(1).drop(["stream"]), data / "cpu.parquet")
    code, out = invoke("replay", data / "cpu.parquet", "--model", data / "m.safetensors", "--no-progress",
                       "--out", data / "s1.parquet")
    assert code == 0 and "streams 1 " in out


def test_one_stream_with_a_text_column_is_named_with_stream_id(data):
    # One stream carrying a text annotation looks like a fleet without its id column: refused,
    # and --stream-id says it is one stream (train and replay alike).
    one = fleet_table(1).drop(["stream"])
    pq.write_table(one.append_column("status", pa.array(["ok", "degraded"] * (T // 2))), data / "cpu.parquet")
    args = ["replay", data / "cpu.parquet", "--model", data / "m.safetensors", "--no-progress",
            "--out", data / "s1.parquet"]
    code, out = invoke(*args)
    assert code == 2 and "--stream-id NAME" in out
    code, out = invoke(*args, "--stream-id", "cpu-1")
    assert code == 0 and "streams 1 " in out
    assert set(pq.read_table(data / "s1.parquet").column("stream").to_pylist()) == {"cpu-1"}
    code, out = invoke("train", data / "cpu.parquet", "--out", data / "m1.safetensors", "--epochs", "1",
                       "--window", "8", "--no-progress", "--stream-id", "cpu-1")
    assert code == 0 and (data / "m1.safetensors").exists(), out


def test_integer_times_in_epoch_seconds_are_refused(data):
    table = fleet_table()
    seconds = table.column("ts").cast(pa.int64()).to_numpy() // 1000
    pq.write_table(table.set_column(1, "ts", pa.array(seconds)), data / "sec.parquet")
    code, out = invoke("replay", data / "sec.parquet", "--model", data / "m.safetensors", "--no-progress",
                       "--out", data / "s.parquet")
    assert code == 2 and "time column 'ts' looks like epoch seconds (1767225600 = 2026-01-01 00:00:00 UTC" in out
    assert "multiply them by 1000" in out and not (data / "s.parquet").exists()
    code, out = invoke("train", data / "sec.parquet", "--out", data / "m2.safetensors", "--no-progress")
    assert code == 2 and "looks like epoch seconds" in out
    # the same instants in epoch milliseconds are read
    pq.write_table(table.set_column(1, "ts", pa.array(seconds * 1000)), data / "ms.parquet")
    code, out = invoke("replay", data / "ms.parquet", "--model", data / "m.safetensors", "--no-progress",
                       "--out", data / "s.parquet")
    assert code == 0 and f"events {S * T:,} " in out


def test_a_csv_value_that_is_not_a_number_is_named_with_its_line(data):
    rows = ["stream,ts,value"] + [f"s{i % 2},{T0 + i * 1000},{i * 0.5}" for i in range(40)]
    rows[12] = f"s1,{T0 + 11 * 1000},n/a?"
    (data / "bad.csv").write_text("\n".join(rows) + "\n")
    code, out = invoke("train", data / "bad.csv", "--out", data / "m2.safetensors", "--no-progress")
    assert code == 2 and "no numeric feature column in" in out and "'value' is string (line 13 holds 'n/a?')" in out
    code, out = invoke("replay", data / "bad.csv", "--model", data / "m.safetensors", "--no-progress",
                       "--out", data / "s.parquet")
    assert code == 2 and "feature column 'value' is string (line 13 holds 'n/a?'), not numeric" in out


def test_train_without_validation_windows_reports_the_training_loss(data):
    # 60 rows per stream: validation parts of 9 rows give no window of 33; the summary said
    # "best validation loss" for what was the training loss
    code, out = invoke("train", data / "live.parquet", "--out", data / "m2.safetensors", "--epochs", "2",
                       "--no-progress", "--report", data / "r.json")
    assert code == 0 and "no validation window" in out and "best training loss" in out
    assert "validation loss" not in out.replace("no validation window", "")
    assert Model.load(data / "m2.safetensors").training["best_loss_on"] == "training"
    code, out = invoke("train", data / "live.parquet", "--out", data / "m3.safetensors", "--epochs", "2",
                       "--window", "4", "--no-progress")
    assert code == 0 and "best validation loss" in out
    assert Model.load(data / "m3.safetensors").training["best_loss_on"] == "validation"


def test_daemon_state_dir_that_is_a_file_fails_before_connecting(data):
    # it failed only after connecting to Kafka (or after the connect error for a bad address)
    code, out = invoke("daemon", "--bootstrap", "127.0.0.1:1", "--input", "m", "--alerts", "a", "--group", "g",
                       "--model", data / "m.safetensors", "--state-dir", data / "live.parquet")
    assert code == 2 and f"state_dir '{data / 'live.parquet'}' is a file, not a directory" in out
    assert "connect" not in out


def _interrupted_midway(target_arg: int):
    """A writer that puts half a file at its target and is then interrupted (Ctrl-C)."""
    def write(*args, **kwargs):
        target = args[target_arg]
        if hasattr(target, "write"):  # an open file (np.savez's)
            target.write(b"half")
        else:
            with open(target, "wb") as fh:
                fh.write(b"half")
        raise KeyboardInterrupt
    return write


def test_an_interrupted_report_or_checkpoint_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch):
    import matplotlib.figure

    from streamrnn import train as tr

    report = {"model": "m", "training": {"loss": "mse"},
              "epochs": [{"epoch": 1, "train_loss": 1.0, "valid_loss": 0.5}]}
    path = tmp_path / "r.json"
    tr.write_report(path, report)
    before = path.read_bytes(), path.with_suffix(".png").read_bytes()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _interrupted_midway(1))
    report["epochs"].append({"epoch": 2, "train_loss": 0.5, "valid_loss": 0.4})
    with pytest.raises(KeyboardInterrupt):
        tr.write_report(path, report)
    assert path.with_suffix(".png").read_bytes() == before[1]  # not half a PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]
    monkeypatch.undo()

    from streamrnn.optim import Adam

    state = tr.LoopState(np.zeros(3), np.zeros(3))
    ckpt = tmp_path / "c.npz"
    tr.save_checkpoint(ckpt, state, Adam(3), {})
    old = ckpt.read_bytes()
    monkeypatch.setattr(np, "savez", _interrupted_midway(0))
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint(ckpt, state, Adam(3), {})
    assert ckpt.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "r.json", "r.png"]


def test_train_resume_errors(data):
    base = ["train", data / "live.parquet", "--out", data / "m2.safetensors", "--window", "8", "--no-progress"]
    code, out = invoke(*base, "--resume", data / "nope.ckpt.npz")
    assert code == 2 and f"--resume {data / 'nope.ckpt.npz'}: no such checkpoint file" in out
    assert "no validation window" not in out  # refused before the data was read
    code, out = invoke(*base, "--resume", data / "live.parquet")
    assert code == 2 and "is not a streamrnn training checkpoint (not a NumPy .npz file)" in out
    assert "pickle" not in out and "unsafely" not in out


def test_labels_listing_every_event_with_a_flag_column(data):
    # A per-event label file (every event, is_anomaly 0/1) counted every row as a label point:
    # F1 against "all events are anomalies". Only the flagged rows are labels.
    code, _ = invoke(*replay_args(data, "--out", data / "s.parquet", "--threshold", "0.05"))
    assert code == 0
    scores = pq.read_table(data / "s.parquet").select(["stream", "ts"])
    flagged = np.zeros(scores.num_rows, bool)
    flagged[np.flatnonzero(scores.column("stream").to_numpy(zero_copy_only=False) == "s2")[40:46]] = True
    pq.write_table(scores.append_column("is_anomaly", pa.array(flagged.astype(np.int64))), data / "every.parquet")
    pq.write_table(scores.filter(pa.array(flagged)), data / "only.parquet")
    code, every = invoke("evaluate", data / "s.parquet", "--labels", data / "every.parquet")
    code2, only = invoke("evaluate", data / "s.parquet", "--labels", data / "only.parquet")
    assert code == code2 == 0 and "/1 label events detected" in only
    assert every == only
    # the SCORES file as labels, and the two files the wrong way round
    code, out = invoke("evaluate", data / "s.parquet", "--labels", data / "s.parquet")
    assert code == 2 and "s.parquet is a SCORES file (replay's output" in out
    code, out = invoke("evaluate", data / "only.parquet", "--labels", data / "s.parquet")
    assert code == 2 and "wrong way round" in out and "s.parquet is the SCORES file" in out
    # labels in epoch seconds would match no event
    secs = scores.filter(pa.array(flagged))
    secs = secs.set_column(1, "ts", pa.array(secs.column("ts").cast(pa.int64()).to_numpy() // 1000))
    pq.write_table(secs, data / "secs.parquet")
    code, out = invoke("evaluate", data / "s.parquet", "--labels", data / "secs.parquet")
    assert code == 2 and "looks like epoch seconds" in out


def test_broker_log_that_cannot_be_written(tmp_path):
    # the broker's log file was opened by daemon.broker: a traceback (FileNotFoundError)
    code, out = invoke("broker", "--log", tmp_path / "nope" / "b.log")
    assert code == 2 and f"--log {tmp_path / 'nope' / 'b.log'}: cannot write it (No such file or directory)" in out
    code, out = invoke("broker", "--log", tmp_path)
    assert code == 2 and "cannot write it (Is a directory)" in out


def test_demo_options_checked_before_anything_starts(tmp_path):
    (tmp_path / "f").write_text("x")
    code, out = invoke("demo", "--workdir", tmp_path / "f")
    assert code == 2 and f"--workdir {tmp_path / 'f'} is a file, not a directory" in out
    code, out = invoke("demo", "--partitions", "0", "--workdir", tmp_path / "w")
    assert code == 2 and "--partitions must be at least 1, not 0" in out
    code, out = invoke("demo", "--speed", "0", "--workdir", tmp_path / "w")
    assert code == 2 and "--speed must be positive" in out
    assert not (tmp_path / "w").exists()  # nothing was generated


def test_train_says_how_many_rows_it_dropped_merged_or_filled(data):
    table = fleet_table()
    values = table.column("value").to_numpy().copy()
    values[[5, 70]] = np.inf
    table = table.set_column(2, "value", pa.array(values))
    changed = table.slice(100, 7).set_column(2, "value", pa.array(np.arange(7.0)))
    pq.write_table(pa.concat_tables([table, table.slice(0, 3), changed]), data / "messy.parquet")
    code, out = invoke("train", data / "messy.parquet", "--out", data / "m2.safetensors", "--epochs", "1",
                       "--window", "8", "--no-progress")
    assert code == 0
    assert (f"data: {S * T + 10:,} rows read; 3 exact duplicate rows dropped; 7 rows merged into another of "
            f"their stream and timestamp (mean kept); 2 infinite values read as missing; 2 missing values filled") in out
    code, out = invoke("train", data / "live.parquet", "--out", data / "m3.safetensors", "--epochs", "1",
                       "--window", "8", "--no-progress")
    assert code == 0 and "data:" not in out  # clean data: no line


def test_a_directory_whose_files_name_the_value_differently(data):
    (data / "hist").mkdir()
    table = fleet_table()
    pq.write_table(table.slice(0, 120), data / "hist" / "a.parquet")
    pq.write_table(table.slice(120).rename_columns(["stream", "ts", "val"]), data / "hist" / "b.parquet")
    code, out = invoke("train", data / "hist", "--out", data / "m2.safetensors", "--no-progress")
    assert code == 2
    assert (f"feature column 'value' is in {data / 'hist' / 'a.parquet'} but not in {data / 'hist' / 'b.parquet'}; "
            f"give the files the same columns or name the features with --features") in out


def test_replay_output_inside_the_input_directory(data):
    # scores written into the directory being replayed were read back as data by the next run
    (data / "hist").mkdir()
    pq.write_table(fleet_table(), data / "hist" / "a.parquet")
    code, out = invoke("replay", data / "hist", "--model", data / "m.safetensors", "--no-progress",
                       "--out", data / "hist" / "scores.parquet")
    assert code == 2 and f"is inside the input directory {data / 'hist'}" in out
    assert sorted(p.name for p in (data / "hist").iterdir()) == ["a.parquet"]
    # a file that is not data (a model, a report) may sit beside the data
    code, out = invoke("train", data / "hist", "--out", data / "hist" / "m.safetensors", "--epochs", "1",
                       "--window", "8", "--no-progress", "--report", data / "hist" / "r.json")
    assert code == 0, out


def test_replay_scores_and_alerts_to_one_file(data):
    code, out = invoke(*replay_args(data, "--out", data / "s.parquet", "--alerts-out", data / "." / "s.parquet"))
    assert code == 2 and "--out and --alerts-out are both" in out and not (data / "s.parquet").exists()


def test_replay_output_named_like_text(data):
    # Parquet bytes went into scores.csv; evaluate then read it as CSV ("CSV parse error: ...")
    code, out = invoke(*replay_args(data, "--out", data / "s.csv"))
    assert code == 2 and f"--out {data / 's.csv'}: replay writes Parquet; give the file a .parquet name" in out
    code, out = invoke(*replay_args(data, "--out", data / "s.parquet", "--alerts-out", data / "a.json"))
    assert code == 2 and "--alerts-out" in out and "replay writes Parquet" in out
    assert not list(data.glob("s.*"))


def test_train_outputs_that_are_one_file(data):
    # --report r.png: the JSON report was written, then the loss-curve PNG over it
    base = ["train", data / "live.parquet", "--epochs", "1", "--window", "8", "--no-progress"]
    code, out = invoke(*base, "--out", data / "m2.safetensors", "--report", data / "r.png")
    assert code == 2 and "--report and --report (its PNG) are both" in out
    code, out = invoke(*base, "--out", data / "m2.safetensors", "--checkpoint", data / "m2.safetensors")
    assert code == 2 and "--out and --checkpoint are both" in out


def test_labels_that_match_nothing_scored(data):
    # labels under other ids printed "0/0 label events detected", F1 n/a, with exit code 0
    code, _ = invoke(*replay_args(data, "--out", data / "s.parquet"))
    assert code == 0
    at = pa.array([T0 + 600_000] * 2).cast(pa.timestamp("ms", tz="UTC"))
    pq.write_table(pa.table({"stream": ["S1", "S2"], "ts": at}), data / "labels.parquet")
    code, out = invoke("evaluate", data / "s.parquet", "--labels", data / "labels.parquet")
    assert code == 2 and "none of the 2 labels in" in out and "label streams e.g. 'S1', 'S2', scored 's0', 's1'" in out
    # one label that matches is enough to evaluate
    pq.write_table(pa.table({"stream": ["S1", "s1"], "ts": at}), data / "labels.parquet")
    code, out = invoke("evaluate", data / "s.parquet", "--labels", data / "labels.parquet")
    assert code == 0 and "unmatched labels 1" in out


def test_a_time_column_under_another_name_is_suggested(data):
    # NAB's files: "timestamp,value"
    (data / "nab.csv").write_text("timestamp,value\n" + "".join(
        f"2014-04-01 00:{m:02d}:00,{20 + m % 7}\n" for m in range(60)))
    code, out = invoke("train", data / "nab.csv", "--out", data / "m2.safetensors", "--no-progress")
    assert code == 2 and "time column 'ts' not found (columns: timestamp, value); is it 'timestamp'? " \
                         "pass --time-col timestamp" in out
    code, out = invoke("train", data / "nab.csv", "--out", data / "m2.safetensors", "--no-progress",
                       "--time-col", "timestamp", "--window", "8", "--epochs", "1")
    assert code == 0, out


def test_csv_times_in_a_local_format(data):
    # "01/04/2014 00:00" is text to the CSV reader: the column used to be suggested as the
    # stream id ("text column(s) 'timestamp': pass --stream-col timestamp")
    (data / "nab.csv").write_text("timestamp,value\n" + "".join(f"01/04/2014 00:{m:02d},{m}\n" for m in range(40)))
    code, out = invoke("train", data / "nab.csv", "--out", data / "m2.safetensors", "--no-progress")
    assert code == 2 and "pass --time-col timestamp" in out and "--stream-col" not in out
    code, out = invoke("train", data / "nab.csv", "--out", data / "m2.safetensors", "--no-progress",
                       "--time-col", "timestamp")
    assert code == 2 and "time column 'timestamp' is string" in out
    assert "CSV times are read as ISO 8601, like 2026-01-01T00:00:00Z; line 2 holds '01/04/2014 00:00'" in out


def test_a_time_delta_model_replays_files_without_a_dt_column(data):
    # a model trained with --time-delta failed in replay with "feature column 'dt' not found";
    # replay (and the daemon) now derive dt from the timestamps
    code, out = invoke("train", data / "live.parquet", "--out", data / "td.safetensors", "--time-delta",
                       "--epochs", "1", "--window", "8", "--no-progress")
    assert code == 0 and "'dt'" not in out
    code, out = invoke("replay", data / "live.parquet", "--model", data / "td.safetensors", "--out",
                       data / "s.parquet", "--no-progress")
    assert code == 0, out
    # a file with the column a user computed before (it is derived all the same)
    table = fleet_table()  # stream by stream, one event a minute
    dt = np.where(np.arange(table.num_rows) % T == 0, 0.0, 60.0)
    pq.write_table(table.append_column("dt", pa.array(dt)), data / "with_dt.parquet")
    code, out = invoke("replay", data / "with_dt.parquet", "--model", data / "td.safetensors", "--out",
                       data / "s2.parquet", "--no-progress")
    assert code == 0, out
    a, b = pq.read_table(data / "s.parquet"), pq.read_table(data / "s2.parquet")
    assert a.column_names == b.column_names and "dt" not in a.column_names
    assert np.array_equal(a["score"].to_numpy(), b["score"].to_numpy(), equal_nan=True)
    # naming too few columns says which features the model takes and that dt is derived
    code, out = invoke("replay", data / "live.parquet", "--model", data / "td.safetensors", "--features", "a,b,c,d,e",
                       "--out", data / "s3.parquet", "--no-progress")
    assert code == 2 and "('dt' is derived from the timestamps)" in out, out


def test_rows_without_a_stream_id_are_refused_by_train_replay_and_evaluate(data):
    ids = fleet_table().column("stream").to_pylist()
    for i in (3, 70, 71):
        ids[i] = ""
    ids[100] = None
    pq.write_table(fleet_table().set_column(0, "stream", pa.array(ids, pa.string())), data / "blank.parquet")
    want = ("stream column 'stream' is empty or null in 4 rows (rows 4, 71, 72, 101, counting data rows "
            "from 1); every row needs a stream id")
    code, out = invoke("train", data / "blank.parquet", "--out", data / "m2.safetensors", "--no-progress")
    assert code == 2 and f"blank.parquet: {want}" in out, out
    code, out = invoke(*replay_args(data, "--out", data / "s.parquet")[:1], data / "blank.parquet",
                       *replay_args(data, "--out", data / "s.parquet")[2:])
    assert code == 2 and f"blank.parquet: {want}" in out, out
    assert not (data / "s.parquet").exists()
    code, out = invoke(*replay_args(data, "--out", data / "s.parquet"))
    assert code == 0, out
    pq.write_table(pa.table({"stream": ["s0", "", None], "ts": [T0, T0 + 60_000, T0]}), data / "labels.parquet")
    code, out = invoke("evaluate", data / "s.parquet", "--labels", data / "labels.parquet")
    assert code == 2 and ("labels.parquet: stream column 'stream' is empty or null in 2 rows (rows 2, 3, "
                          "counting data rows from 1)") in out, out
    scores = pq.read_table(data / "s.parquet")
    scores = scores.set_column(0, "stream", pa.array([""] + scores.column("stream").to_pylist()[1:]))
    pq.write_table(scores, data / "s2.parquet")
    code, out = invoke("evaluate", data / "s2.parquet", "--labels", data / "labels.parquet")
    assert code == 2 and "s2.parquet: stream column 'stream' is empty or null in 1 row (row 1, counting" in out, out
    (data / "labels.csv").write_text(f"stream,ts\ns0,{T0}\n,{T0}\n")
    code, out = invoke("evaluate", data / "s.parquet", "--labels", data / "labels.csv")
    assert code == 2 and "labels.csv: stream column 'stream' is empty or null in 1 row (line 3)" in out, out
    from streamrnn.evaluate import EvaluationError, load_labels
    with pytest.raises(EvaluationError, match="empty or null in 1 row"):
        load_labels(data / "labels.csv")
    code, out = invoke(*replay_args(data, "--out", data / "s3.parquet", "--stream-col", "x", "--stream-id", ""))
    assert code == 2 and "the stream id for files without a stream column is empty" in out, out


def test_daemon_set_with_an_unknown_name_names_it_and_the_valid_ones():
    # it said "flag: unknown setting 'foo'": --set was not named, and no valid name was offered
    code, out = invoke("daemon", "--set", "checkpoint-intervl-ms=5")
    assert code == 2 and ("error: --set checkpoint-intervl-ms=5: unknown setting 'checkpoint_intervl_ms'; "
                          "did you mean 'checkpoint_interval_ms'") in out, out
    code, out = invoke("daemon", "--set", "foo=1")
    assert code == 2 and "--set foo=1: unknown setting 'foo'; the settings are acks, alerts," in out, out
    assert "bootstrap" in out and "values_field" in out
    code, out = invoke("daemon", "--set", "threshold=0.9")
    assert code == 2 and "'threshold' is a scoring setting: put it under [scoring] in the --config" in out, out


def test_a_missing_input_suggests_the_file_beside_it(data, monkeypatch):
    # README's "streamrnn train history/" in the demo's directory, which holds history.parquet
    monkeypatch.chdir(data)
    pq.write_table(fleet_table(), data / "history.parquet")
    code, out = invoke("train", "history/", "--out", "m2.safetensors")
    assert code == 2 and "error: no such file or directory: history; did you mean history.parquet?" in out
    code, out = invoke("replay", "liv.parquet", "--model", "m.safetensors", "--out", "s.parquet")
    assert code == 2 and "no such file or directory: liv.parquet; did you mean live.parquet?" in out
    code, out = invoke("evaluate", "live", "--labels", "x.parquet")
    assert code == 2 and "live: no such file; did you mean live.parquet?" in out
    code, out = invoke("plot", "histori.parquet", "--out-dir", "p")
    assert code == 2 and "histori.parquet: no such file; did you mean history.parquet?" in out
    code, out = invoke("train", "nothing-like-it", "--out", "m2.safetensors")
    assert code == 2 and out.strip() == "error: no such file or directory: nothing-like-it"


def test_output_lines_are_not_cut_at_80_columns(data):
    # piped output was hard-wrapped by rich at 80 columns, splitting one record over two lines
    r = runner.invoke(app, [str(a) for a in replay_args(data, "--out", data / "s.parquet")])
    assert r.exit_code == 0, r.output
    counters = [ln for ln in r.output.splitlines() if ln.startswith("counters")]
    assert len(counters) == 1 and len(counters[0]) > 80 and counters[0].rstrip().endswith(tuple("0123456789"))
    long_error = runner.invoke(app, ["evaluate", str(data / "s.parquet"), "--labels",
                                     str(data / ("x" * 90 + ".parquet"))]).output
    assert long_error.count("\n") == 1 and "no such file" in long_error


def test_train_output_named_like_another_format(data):
    # README walk: "train ... --out out.parquet" wrote a safetensors model named out.parquet
    for name in ("m.parquet", "m.csv", "m.json", "m.png", "m.npz"):
        code, out = invoke("train", data / "live.parquet", "--out", data / name, "--no-progress")
        assert code == 2 and f"--out {data / name}: train writes a safetensors model; give the file a " \
                             ".safetensors name" in out, out
        assert not (data / name).exists()
    code, out = invoke(*replay_args(data, "--out", data / "s.safetensors"))
    assert code == 2 and "replay writes Parquet; give the file a .parquet name" in out
    code, out = invoke("train", data / "live.parquet", "--out", data / "model", "--epochs", "1", "--window", "8",
                       "--no-progress")
    assert code == 0 and Model.load(data / "model").feature_names == ["value"]  # no suffix: fine
