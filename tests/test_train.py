"""The trainer: learning against PyTorch, reproducibility, resume, leakage, CLI and bad input."""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import numba
import torch
from typer.testing import CliRunner

from streamrnn import Model
from streamrnn.cli import app
from streamrnn.train import TrainConfig, TrainError, fit, prepare, train

T0 = 1_767_225_600_000  # 2026-01-01 in epoch ms
AMPS = (1.0, 10.0, 100.0, 0.5)
LEVELS = (0.0, 50.0, -300.0, 2.0)
NOISE = 0.1  # noise std as a fraction of each stream's amplitude


def sines(path: Path, n_rows: int = 600, seed: int = 0, period: float = 20.0) -> dict[str, float]:
    """Sines plus noise, streams with different scales; returns each stream's noise variance."""
    rng = np.random.default_rng(seed)
    streams, ts, values, noise_var = [], [], [], {}
    for s, (amp, level) in enumerate(zip(AMPS, LEVELS)):
        t = np.arange(n_rows)
        v = level + amp * (np.sin(2 * np.pi * t / period + s) + NOISE * rng.normal(size=n_rows))
        streams += [f"s{s}"] * n_rows
        ts.append(T0 + t * 60_000)
        values.append(v)
        noise_var[f"s{s}"] = (amp * NOISE) ** 2
    pq.write_table(pa.table({"stream": streams, "ts": np.concatenate(ts), "value": np.concatenate(values)}), path)
    return noise_var


def held_out_mse_ratio(model: Model, path: Path, noise_var: dict[str, float], held_out: float = 0.15) -> float:
    """Mean over streams of (one-step MSE on the newest rows) / noise variance, states warm."""
    table = pq.read_table(path).to_pandas()
    ratios = []
    for s, df in table.groupby("stream"):
        x = df.sort_values("ts")["value"].to_numpy()[:, None]
        pred = model.predict(x, stream=s)[:-1, 0]
        err = (pred - x[1:, 0]) ** 2
        n_held = int(round(len(x) * held_out))
        ratios.append(err[-n_held:].mean() / noise_var[s])
    return float(np.mean(ratios))


# ------------------------------------------------------------------- PyTorch reference
def torch_fit(model: Model, windows: np.ndarray, cfg: TrainConfig) -> Model:
    """The same network, initial weights, Adam, clipping, batches and epochs in PyTorch."""
    torch.manual_seed(0)
    rnn = torch.nn.GRU(model.n_features, model.hidden[0], batch_first=True)
    head = torch.nn.Linear(model.hidden[0], model.n_features)
    with torch.no_grad():
        layer = model.layers[0]
        rnn.weight_ih_l0.copy_(torch.tensor(layer["w_ih"]))
        rnn.weight_hh_l0.copy_(torch.tensor(layer["w_hh"]))
        rnn.bias_ih_l0.copy_(torch.tensor(layer["b_ih"]))
        rnn.bias_hh_l0.copy_(torch.tensor(layer["b_hh"]))
        head.weight.copy_(torch.tensor(model.head_weight))
        head.bias.copy_(torch.tensor(model.head_bias))
    params = list(rnn.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    x = torch.tensor(windows)
    n = len(windows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is PyTorch's fastest setting here
    try:
        _torch_epochs(rnn, head, params, opt, x, n, cfg)
    finally:
        torch.set_num_threads(threads)
    return Model.from_torch(rnn, head)


def _torch_epochs(rnn, head, params, opt, x, n, cfg):
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        for b in range(0, n, cfg.batch_size):
            xb = x[order[b:b + cfg.batch_size]]
            opt.zero_grad()
            loss = ((head(rnn(xb[:, :-1])[0]) - xb[:, 1:]) ** 2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()


@pytest.mark.slow
def test_learns_sines_as_well_as_pytorch(tmp_path):
    data = tmp_path / "sines.parquet"
    noise_var = sines(data, n_rows=600)
    opts = dict(cell="gru", hidden=[16], window=20, stride=2, batch_size=32, epochs=20, lr=1e-2,
                clip=1.0, schedule="constant", patience=None, restore_best=False, seed=0,
                per_stream_scaler=True)
    result = train([data], tmp_path / "m.safetensors", **opts)
    ours = held_out_mse_ratio(result.model, data, noise_var)
    cfg = TrainConfig(**{k: (tuple(v) if k == "hidden" else v) for k, v in opts.items()})
    prep = prepare([data], cfg)
    init = Model.random("gru", n_features=1, hidden=[16], seed=0)
    theirs_model = torch_fit(init, prep.train_windows, cfg)
    fields = prep.scaler.model_fields()
    theirs_model.scaler_mean, theirs_model.scaler_scale = fields["scaler_mean"], fields["scaler_scale"]
    theirs_model.stream_scaler = fields["stream_scaler"]
    theirs = held_out_mse_ratio(theirs_model, data, noise_var)
    assert ours < 1.5, (ours, theirs)
    assert ours <= 1.2 * theirs, (ours, theirs)


def test_per_stream_scaler_units(tmp_path):
    data = tmp_path / "sines.parquet"
    sines(data, n_rows=200)
    cfg = TrainConfig(window=8, stride=4, per_stream_scaler=True)
    prep = prepare([data], cfg)
    train_rows = pq.read_table(data).to_pandas().groupby("stream").head(140)
    for s, df in train_rows.groupby("stream"):
        i = prep.scaler.stream_ids.index(s)
        assert prep.scaler.stream_mean[i, 0] == pytest.approx(df["value"].mean(), rel=1e-12, abs=1e-12)
        assert prep.scaler.stream_scale[i, 0] == pytest.approx(df["value"].std(ddof=0), rel=1e-12)
    # scaled training windows are unit-scale whatever the stream's amplitude
    assert np.abs(prep.train_windows).max() < 3.0


# ------------------------------------------------------- reproducibility and resume
SMALL = dict(cell="lstm", hidden=[6], window=8, stride=4, batch_size=16, epochs=3, lr=1e-2, seed=5)


def weights(model: Model) -> dict[str, np.ndarray]:
    return model.tensors()


def same_weights(a: Model, b: Model) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_same_seed_same_model_bit_for_bit(tmp_path):
    data = tmp_path / "sines.parquet"
    sines(data, n_rows=200)
    a = train([data], tmp_path / "a.safetensors", **SMALL)
    b = train([data], tmp_path / "b.safetensors", **SMALL)
    c = train([data], tmp_path / "c.safetensors", **{**SMALL, "seed": 6})
    assert same_weights(a.model, b.model)
    assert a.model.thresholds == b.model.thresholds
    assert [e["train_loss"] for e in a.epochs] == [e["train_loss"] for e in b.epochs]
    assert not same_weights(a.model, c.model)
    loaded = Model.load(tmp_path / "a.safetensors")
    assert same_weights(loaded, a.model)


def test_threads_option_gives_back_the_callers_thread_count(tmp_path):
    data = tmp_path / "sines.parquet"
    sines(data, n_rows=120)
    before = numba.get_num_threads()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    try:
        train([data], tmp_path / "a.safetensors", **{**SMALL, "epochs": 1}, threads=1)
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
        with pytest.raises(TrainError):  # an error inside the run restores it too
            train([data], tmp_path / "b.safetensors", **{**SMALL, "window": 10_000}, threads=1)
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    finally:
        numba.set_num_threads(before)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    data = tmp_path / "sines.parquet"
    sines(data, n_rows=200)
    cfg = TrainConfig(cell="gru", hidden=(5,), window=8, stride=4, batch_size=16, epochs=4, lr=1e-2,
                      schedule="cosine", patience=None)
    prep = prepare([data], cfg)
    net = cfg.net(1)
    theta0 = net.theta(Model.random("gru", 1, [5], seed=0), np.float64)
    full = fit(net, theta0, prep.train_windows, prep.valid_windows, cfg)

    class Crash(Exception):
        pass

    def crash_after_two(state):
        if state.epoch == 2:
            raise Crash

    ckpt = tmp_path / "run.ckpt.npz"
    with pytest.raises(Crash):
        fit(net, theta0, prep.train_windows, prep.valid_windows, cfg, checkpoint=ckpt, on_epoch=crash_after_two)
    resumed = fit(net, theta0, prep.train_windows, prep.valid_windows, cfg, checkpoint=ckpt, resume=ckpt)
    assert np.array_equal(resumed.theta, full.theta)
    assert resumed.history == [{**e, "seconds": r["seconds"], "windows_per_second": r["windows_per_second"]}
                               for e, r in zip(full.history, resumed.history)]
    other = TrainConfig(**{**cfg.__dict__, "hidden": (6,)})
    with pytest.raises(TrainError, match="different run"):
        fit(other.net(1), other.net(1).theta(Model.random("gru", 1, [6]), np.float64),
            prep.train_windows, prep.valid_windows, other, resume=ckpt,
            fingerprint={"config": other.as_dict()})


# ------------------------------------------------------------------------ leakage
def test_data_after_a_split_point_changes_nothing_before_it(tmp_path):
    n = 200
    clean, changed = tmp_path / "clean.parquet", tmp_path / "changed.parquet"
    sines(clean, n_rows=n)
    table = pq.read_table(clean).to_pandas()
    # every row of the validation and calibration parts (the newest 30% per stream) altered
    newest = table.groupby("stream").cumcount() >= n - round(0.15 * n) - round(0.15 * n)
    table.loc[newest, "value"] = table.loc[newest, "value"] * 3 + 1000
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), changed)
    opts = {**SMALL, "patience": None, "restore_best": False, "per_stream_scaler": True}
    a = train([clean], tmp_path / "a.safetensors", **opts)
    b = train([changed], tmp_path / "b.safetensors", **opts)
    for key in ("scaler.mean", "scaler.scale", "scaler.stream_mean", "scaler.stream_scale"):
        assert np.array_equal(a.model.tensors()[key], b.model.tensors()[key])
    assert same_weights(a.model, b.model)
    assert [e["train_loss"] for e in a.epochs] == [e["train_loss"] for e in b.epochs]
    assert [e["valid_loss"] for e in a.epochs] != [e["valid_loss"] for e in b.epochs]
    assert a.model.thresholds != b.model.thresholds  # calibration did see the newest part
    # altering only the calibration part leaves early stopping's choice alone too
    table = pq.read_table(clean).to_pandas()
    calib = table.groupby("stream").cumcount() >= n - round(0.15 * n)
    table.loc[calib, "value"] = -table.loc[calib, "value"]
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), changed)
    c = train([clean], tmp_path / "c.safetensors", **{**SMALL, "per_stream_scaler": True})
    d = train([changed], tmp_path / "d.safetensors", **{**SMALL, "per_stream_scaler": True})
    assert same_weights(c.model, d.model) and c.epochs[-1]["valid_loss"] == d.epochs[-1]["valid_loss"]
    assert c.model.thresholds["events"] == d.model.thresholds["events"]


def test_history_read_in_parts_holds_one_part_at_a_time(tmp_path):
    # Bounded memory: a pass over a history of several parts lets each part go once the next
    # is read; only a history that is a single part is kept for the next pass.
    path = tmp_path / "h.parquet"
    sines(path, n_rows=300)
    prep = prepare([path], TrainConfig(window=8, stride=4, max_rows=300))
    refs = []
    for part, split in prep.parts():
        refs.append(weakref.ref(part))
        del part, split
        gc.collect()
        assert sum(r() is not None for r in refs) == 1
    assert len(refs) == len(AMPS)  # one stream per part
    gc.collect()
    assert all(r() is None for r in refs)
    whole = prepare([path], TrainConfig(window=8, stride=4))
    assert [p for p, _ in whole.parts()][0] is [p for p, _ in whole.parts()][0]


# ----------------------------------------------------------------------------- CLI
runner = CliRunner()


def run_cli(*args: str):
    result = runner.invoke(app, ["train", *map(str, args), "--no-progress"])
    return result, result.output


def test_cli_train_writes_model_metadata_and_report(tmp_path):
    # no stream column (one stream), Parquet timestamps, two features, a Gaussian head
    n = 240
    t = np.arange(n)
    ts = pa.array((T0 + t * 60_000).astype("datetime64[ms]"), pa.timestamp("ms", tz="UTC"))
    rng = np.random.default_rng(1)
    pq.write_table(pa.table({"ts": ts, "cpu": np.sin(t / 5) + 0.1 * rng.normal(size=n),
                             "mem": 100 + 5 * np.cos(t / 7)}), tmp_path / "host.parquet")
    out, report = tmp_path / "m.safetensors", tmp_path / "report.json"
    result, text = run_cli(tmp_path / "host.parquet", "--out", out, "--cell", "gru", "--hidden", "6,4",
                           "--window", "10", "--epochs", "2", "--loss", "gaussian", "--report", report,
                           "--reset-before", "--calibration", "quantile")
    assert result.exit_code == 0, text
    model = Model.load(out)
    assert model.head == "gaussian" and model.hidden == [6, 4] and not model.reset_after
    assert model.feature_names == ["cpu", "mem"]
    info = model.training
    assert info["data_paths"] == [str(tmp_path / "host.parquet")]
    assert info["rows"]["rows"] == n and info["rows"]["rows_train"] == n - 2 * round(0.15 * n)
    assert info["time_range"]["min_ms"] == T0 and info["time_range"]["max_ms"] == T0 + (n - 1) * 60_000
    assert info["features"] == ["cpu", "mem"] and info["hyper_parameters"]["window"] == 10
    assert info["epochs_run"] == 2 and math.isfinite(info["best_valid_loss"])
    assert model.streamrnn_version and "threshold" in model.thresholds
    # --calibration quantile reaches calibrate and is recorded in the model's metadata
    assert model.thresholds["calibration"] == "quantile" and "pot_fallback" not in model.thresholds
    assert info["hyper_parameters"]["calibration"] == "quantile"
    assert model.thresholds["threshold"] == model.thresholds["quantile_threshold"]
    rep = json.loads(report.read_text())
    assert [e["epoch"] for e in rep["epochs"]] == [1, 2]
    assert report.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mean, var = model.predict_distribution(np.zeros((5, 2)))
    assert mean.shape == (5, 2) and np.all(var > 0)
    # the scaler was fitted on the training rows only
    train_rows = pq.read_table(tmp_path / "host.parquet").to_pandas().iloc[: info["rows"]["rows_train"]]
    np.testing.assert_allclose(model.scaler_mean, train_rows[["cpu", "mem"]].mean(), rtol=1e-12)


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bad_inputs(tmp: Path) -> dict[str, tuple[list, str]]:
    good = tmp / "good.parquet"
    sines(good, n_rows=120)
    empty = tmp / "empty.parquet"
    empty.write_bytes(b"")
    header_only = _csv(tmp / "header.csv", "stream,ts,value\n")
    text_feature = _csv(tmp / "text.csv", "stream,ts,value,host\n" + "".join(
        f"a,{T0 + i * 1000},{i},h{i}\n" for i in range(100)))
    short = _csv(tmp / "short.csv", "stream,ts,value\n" + "".join(f"a,{T0 + i * 1000},{i}\n" for i in range(12)))
    nan = tmp / "nan.parquet"
    pq.write_table(pa.table({"stream": ["a"] * 100, "ts": T0 + np.arange(100) * 1000,
                             "value": np.arange(100.0), "temp": np.full(100, np.nan)}), nan)
    return {
        "empty file": ([empty], "empty"),
        "no rows": ([header_only], "no rows"),
        "missing column": ([good, "--features", "value,latency"], "'latency' not found"),
        "missing time column": ([good, "--time-col", "time"], "time column 'time' not found"),
        "non-numeric feature": ([text_feature, "--features", "value,host"], "not numeric"),
        "stream shorter than a window": ([short, "--window", "32"], "fewer than --window + 1"),
        "all-NaN feature": ([nan], "'temp' has no value"),
        "bad option": ([good, "--cell", "transformer"], "cell must be one of"),
        "bad hidden": ([good, "--hidden", "32,x"], "--hidden takes integers"),
        "bad calibration": ([good, "--calibration", "spot"], "calibration must be 'pot' or 'quantile'"),
    }


def test_bad_input_gives_one_clear_message(tmp_path):
    for case, (args, fragment) in _bad_inputs(tmp_path).items():
        result, text = run_cli(*args, "--out", tmp_path / "m.safetensors", "--epochs", "1")
        assert result.exit_code == 2, (case, text)
        assert fragment in " ".join(text.split()), (case, text)
        assert "Traceback" not in text and text.count("error:") == 1, (case, text)
        assert not (tmp_path / "m.safetensors").exists(), case


def test_epoch_seconds_leave_out_kernel_compiling(tmp_path, monkeypatch):
    # On a cold cache the first epoch's minutes of compiling made train report a few windows/s.
    import time

    from numba.core import event

    from streamrnn import train as train_mod

    data = tmp_path / "sines.parquet"
    sines(data, n_rows=120)
    plain = train_mod.Stepper.step
    pause = 2.0
    calls = []

    def step_compiling_first(self, *args, **kwargs):
        if not calls:  # the first step of the first epoch compiles, as on a cold cache
            with event.trigger_event("numba:compile"):
                time.sleep(pause)
        calls.append(1)
        return plain(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.Stepper, "step", step_compiling_first)
    res = train([data], tmp_path / "a.safetensors", **{**SMALL, "epochs": 2})
    assert len(calls) > 1 and len(res.epochs) == 2
    # A few hundred windows take milliseconds an epoch; the old code counted the pause in.
    assert all(0 < e["seconds"] < pause - 0.5 for e in res.epochs)
    n = res.epochs[0]["windows_per_second"] * res.epochs[0]["seconds"]
    assert n == pytest.approx(res.epochs[1]["windows_per_second"] * res.epochs[1]["seconds"])
