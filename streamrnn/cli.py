"""The ``streamrnn`` command line: each command parses its arguments and calls the library."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from streamrnn.errors import StreamrnnError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Streaming anomaly detection with recurrent networks compiled by Numba.")
# Lines are not cut at the terminal width (80 columns when piped): one record, one line, for grep and logs.
console = Console(soft_wrap=True)


def _fail(exc: Exception) -> None:
    # Messages quote TOML sections ([scoring]), partitions (metrics[0]) and user paths:
    # escaped, so rich prints them instead of taking them for markup tags.
    console.print(f"[red]error:[/red] {escape(str(exc))}")
    raise typer.Exit(code=2)


@app.callback()
def _check_environment() -> None:
    # Before every command: a misspelt STREAMRNN_* variable would be ignored without a word.
    from daemon.config import unknown_env_warnings

    for line in unknown_env_warnings():
        typer.echo(f"warning: {line}", err=True)


def _say(line: str, highlight: bool = True) -> None:
    """Print a line of plain text (stream ids and paths may hold brackets rich would eat)."""
    console.print(line, markup=False, highlight=highlight)


@app.command()
def inspect(model: Path = typer.Argument(..., help="A streamrnn model file (.safetensors).")) -> None:
    """Print a model file's architecture and metadata as JSON, and the features a caller supplies."""
    from streamrnn.detector import describe_inputs
    from streamrnn.model import Model

    try:
        m = Model.load(model)
        inputs = describe_inputs(m)
    except StreamrnnError as exc:
        _fail(exc)
    info = m.metadata()
    info.update(inputs)
    info["state_floats_per_stream"] = m.state_width
    info["flops_per_event"] = m.flops_per_event()
    console.print_json(json.dumps(info))


@app.command()
def demo(streams: int = typer.Option(300, help="Number of synthetic streams."),
         length: int = typer.Option(1000, help="Events per stream (half history, half live)."),
         hidden: int = typer.Option(32, help="GRU hidden size."),
         epochs: int = typer.Option(6, help="Training epochs."),
         speed: float = typer.Option(5000.0, help="Live period produced at this multiple of real time."),
         partitions: int = typer.Option(4, help="Partitions of the input topic."),
         workdir: Path = typer.Option(None, help="Keep the data, model, scores and logs here (default: a temporary directory)."),
         seed: int = typer.Option(7, help="Seed of the synthetic fleet and the training."),
         per_stream_scaler: bool = typer.Option(True, "--per-stream-scaler/--global-scaler",
                                                help="Train with a scaler per stream, or one for all streams.")) -> None:
    """The main job end to end: train a GRU, run broker and daemon, stream live data, show alerts.

    Synthetic history with labelled anomalies; the live period goes through Kafka; the
    alerts are checked against `streamrnn replay` and evaluated against the labels."""
    from daemon.demo import run_demo

    out = Console(soft_wrap=True)
    try:
        _check_demo_options(workdir, streams=streams, length=length, hidden=hidden, epochs=epochs,
                            partitions=partitions, speed=speed)
        result = run_demo(out, streams=streams, length=length, hidden=hidden, epochs=epochs, speed=speed,
                          partitions=partitions, seed=seed, per_stream_scaler=per_stream_scaler, workdir=workdir)
    except StreamrnnError as exc:
        _fail(exc)
    if result.daemon_exit != 0 or not result.identical:
        out.print("[red]demo failed[/red]: the daemon did not exit cleanly or its alerts differ from replay's")
        raise typer.Exit(code=1)


def _check_demo_options(workdir: Path | None, speed: float, **counts: int) -> None:
    """Before the demo starts a broker and a daemon: options it cannot run with."""
    if workdir is not None and workdir.exists() and not workdir.is_dir():
        raise StreamrnnError(f"--workdir {workdir} is a file, not a directory")
    for name, value in counts.items():
        if value < 1:
            raise StreamrnnError(f"--{name} must be at least 1, not {value}")
    if not speed > 0:
        raise StreamrnnError(f"--speed must be positive, not {speed}")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StreamrnnError(f"{flag} takes integers separated by commas, like 32 or 64,32; got {text!r}") from None
    if not values:
        raise StreamrnnError(f"{flag} needs at least one size")
    return values


@app.command()
def train(paths: list[Path] = typer.Argument(..., help="Parquet/CSV files, directories or hive-partitioned datasets."),
          out: Path = typer.Option(..., "--out", help="Model file to write (.safetensors)."),
          cell: str = typer.Option("gru", "--cell", help="gru, lstm or rnn."),
          hidden: str = typer.Option("32", "--hidden", help="Hidden units per layer, e.g. 32 or 64,32."),
          stream_col: str = typer.Option("stream", "--stream-col", help="Stream id column (absent: one stream per file)."),
          stream_id: str | None = typer.Option(None, "--stream-id", help="Read files without the stream column as this one stream (default: each file is one stream named after it)."),
          time_col: str = typer.Option("ts", "--time-col", help="Time column (timestamp or epoch ms)."),
          features: str | None = typer.Option(None, "--features",
                                              help="Feature columns, comma-separated (default: every other numeric column)."),
          window: int = typer.Option(32, "--window", help="Truncated-BPTT window length (events)."),
          stride: int = typer.Option(8, "--stride", help="Events between window starts."),
          batch_size: int = typer.Option(64, "--batch-size", help="Windows per mini-batch."),
          epochs: int = typer.Option(20, "--epochs", help="Maximum epochs."),
          lr: float = typer.Option(3e-3, "--lr", help="Adam learning rate."),
          clip: float = typer.Option(1.0, "--clip", help="Gradient-norm clipping (0: off)."),
          schedule: str = typer.Option("cosine", "--schedule", help="constant, cosine or plateau."),
          patience: int = typer.Option(5, "--patience", help="Early stopping: epochs without improvement (0: off)."),
          seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same model bit for bit."),
          loss: str = typer.Option("mse", "--loss", help="mse, or gaussian (mean and log-variance head)."),
          scaler: str = typer.Option("zscore", "--scaler", help="zscore or robust (median, IQR)."),
          per_stream_scaler: bool = typer.Option(False, "--per-stream-scaler", help="A scaler per stream."),
          peephole: bool = typer.Option(False, "--peephole", help="LSTM peephole connections."),
          reset_after: bool = typer.Option(True, "--reset-after/--reset-before",
                                           help="GRU reset gate after (PyTorch) or before (Cho et al.) the recurrent product."),
          valid: float = typer.Option(0.15, "--valid", help="Fraction of each stream's newest rows (before calib) for validation."),
          calib: float = typer.Option(0.15, "--calib", help="Fraction of each stream's newest rows for threshold calibration."),
          missing: str = typer.Option("ffill", "--missing", help="Missing values: ffill, drop or zero."),
          max_gap_ms: int | None = typer.Option(None, "--max-gap-ms", help="Split streams at gaps longer than this."),
          time_delta: bool = typer.Option(False, "--time-delta", help="Add a feature 'dt': seconds since the stream's previous event (0 after a gap); replay and the daemon derive it from the timestamps."),
          max_windows: int = typer.Option(200_000, "--max-windows", help="Training windows kept (reservoir sample)."),
          false_alert_rate: float = typer.Option(1e-4, "--false-alert-rate", help="Target false alerts per event for the calibrated threshold (1e-4: ~0.14 per stream per day at 1-minute sampling)."),
          calibration: str = typer.Option("pot", "--calibration", help="Threshold estimator: pot (generalised Pareto tail fit, steadier at small rates) or quantile (empirical)."),
          resume: Path | None = typer.Option(None, "--resume", help="Continue from this checkpoint (.ckpt.npz)."),
          checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Checkpoint path (default OUT.ckpt.npz)."),
          report: Path | None = typer.Option(None, "--report", help="Write a JSON report here and a PNG of the loss curves beside it."),
          threads: int | None = typer.Option(None, "--threads", help="Threads (default: all cores)."),
          progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")) -> None:
    """Train a model on history with Numba BPTT; thresholds are calibrated on the newest part."""
    from streamrnn.train import train as run_train

    try:
        result = run_train(paths, out, cell=cell, hidden=_int_list(hidden, "--hidden"), stream_col=stream_col,
                           stream_id=stream_id,
                           time_col=time_col, features=[f.strip() for f in features.split(",") if f.strip()]
                           if features else None, window=window, stride=stride, batch_size=batch_size,
                           epochs=epochs, lr=lr, clip=clip or None, schedule=schedule, patience=patience or None,
                           seed=seed, loss=loss, scaler=scaler, per_stream_scaler=per_stream_scaler,
                           peephole=peephole, reset_after=reset_after, valid=valid, calib=calib,
                           missing=missing, max_gap_ms=max_gap_ms, time_delta=time_delta,
                           max_windows=max_windows, target_false_alert_rate=false_alert_rate,
                           calibration=calibration, resume=resume, checkpoint=checkpoint, report=report,
                           threads=threads, progress=progress, log=lambda msg: _say(msg, highlight=False))
    except StreamrnnError as exc:
        _fail(exc)
    best = result.best_valid_loss
    watched = result.report["training"]["best_loss_on"]
    _say(f"trained {cell} {hidden}: {len(result.epochs)} epochs, best {watched} loss "
         f"{best:.4g} (epoch {result.best_epoch}), {result.windows_per_second:,.0f} windows/s; "
         f"threshold {result.model.thresholds.get('threshold', float('nan')):.4g}", highlight=False)
    if result.report_path is not None:
        _say(f"report {result.report_path} and {result.png_path}", highlight=False)


def _input_schema(features: str | None, stream_col: str, time_col: str, stream_id: str | None = None):
    from streamrnn.data import Schema

    names = tuple(f.strip() for f in features.split(",") if f.strip()) if features else None
    return Schema(stream_col=stream_col, time_col=time_col, features=names, stream_id=stream_id)


@app.command()
def replay(paths: list[Path] = typer.Argument(..., help="Parquet/CSV files or directories, merged in time order."),
           model: Path | None = typer.Option(None, "--model", help="Model file (required unless --to-kafka)."),
           out: Path | None = typer.Option(None, "--out", help="SCORES Parquet: one row per event."),
           alerts_out: Path | None = typer.Option(None, "--alerts-out", help="Parquet of alert records."),
           to_kafka: str | None = typer.Option(None, "--to-kafka", help="HOST:PORT: produce the events instead."),
           topic: str | None = typer.Option(None, "--topic", help="Topic for --to-kafka."),
           speed: float | None = typer.Option(None, "--speed", help="With --to-kafka: X times the original pace."),
           features: str | None = typer.Option(None, "--features",
                                               help="Input columns for the model's features, comma-separated."),
           stream_col: str = typer.Option("stream", "--stream-col",
                                          help="Stream id column (absent: one stream per file)."),
           stream_id: str | None = typer.Option(None, "--stream-id", help="Read files without the stream column as this one stream (default: each file is one stream named after it)."),
           time_col: str = typer.Option("ts", "--time-col", help="Time column (timestamp or epoch ms)."),
           threshold: float | None = typer.Option(None, "--threshold", help="Override the alert threshold (0-1)."),
           warmup: int | None = typer.Option(None, "--warmup", help="Override the warm-up events per stream."),
           batch_rows: int = typer.Option(65536, "--batch-rows", help="Events per Detector call."),
           progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")) -> None:
    """Score history files with a model, event by event in time order (or produce them to Kafka with --to-kafka)."""
    from streamrnn import replay as rp
    from streamrnn.data import data_notes

    try:
        schema = _input_schema(features, stream_col, time_col, stream_id)
        if to_kafka is not None:
            if topic is None:
                raise StreamrnnError("--to-kafka needs --topic")
            sent = rp.replay_to_kafka(paths, to_kafka, topic, model=model, schema=schema, speed=speed,
                                      batch_rows=batch_rows, progress=progress)
            _say(f"produced {sent.events:,} events in {sent.messages:,} messages to {topic} "
                 f"in {sent.seconds:.2f} s")
            notes = data_notes(sent.input_stats)
            if notes is not None:
                _say(notes)
            return
        if model is None or out is None:
            raise StreamrnnError("replay needs --model and --out (or --to-kafka HOST:PORT --topic T)")
        config = None
        overrides = {k: v for k, v in (("threshold", threshold), ("warmup", warmup)) if v is not None}
        if overrides:
            from streamrnn.scoring import ScoringConfig

            config = ScoringConfig().replace(**overrides)
        result = rp.replay(paths, model, out, alerts_out, schema=schema, batch_rows=batch_rows,
                           config=config, progress=progress)
    except StreamrnnError as exc:
        _fail(exc)
    for line in rp.summary_lines(result):
        _say(line)


@app.command()
def evaluate(scores: Path = typer.Argument(..., help="SCORES Parquet written by replay."),
             labels: Path = typer.Option(..., "--labels",
                                         help="Parquet/CSV labels: stream+ts (points; with a 0/1 label, is_anomaly "
                                              "or anomaly column only the flagged rows) or stream+start+end (windows)."),
             json_out: Path | None = typer.Option(None, "--json", help="Also write the results as JSON."),
             probation: float = typer.Option(0.15, "--probation", help="NAB probationary fraction per stream."),
             per_stream: bool = typer.Option(False, "--per-stream", help="Print a line per stream.")) -> None:
    """Precision/recall/F1 point-wise and per event, AUC-PR, detection delay and NAB scores."""
    from streamrnn.evaluate import evaluate_files, format_report, write_json

    try:
        if not 0.0 <= probation < 1.0:
            raise StreamrnnError(f"--probation must be in [0, 1), not {probation}")
        result = evaluate_files(scores, labels, probation_fraction=probation)
        if json_out is not None:
            write_json(json_out, result)
    except (StreamrnnError, OSError) as exc:
        _fail(exc)
    for line in format_report(result):
        _say(line, highlight=False)
    if per_stream:
        for row in result.per_stream:
            _say("  " + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in row.items()), highlight=False)


@app.command()
def plot(scores: Path = typer.Argument(..., help="SCORES Parquet written by replay."),
         out_dir: Path = typer.Option(..., "--out-dir", help="Directory for the PNG files."),
         labels: Path | None = typer.Option(None, "--labels", help="Labels to draw (as for evaluate)."),
         stream: list[str] | None = typer.Option(None, "--stream", help="Plot this stream (repeatable)."),
         limit: int = typer.Option(16, "--limit", help="Without --stream: the N streams with the most alerts.")) -> None:
    """A PNG per stream (values, prediction band, score, alerts, labels) and small multiples."""
    from streamrnn.plot import plot_scores

    try:
        if limit < 1:
            raise StreamrnnError(f"--limit must be at least 1, not {limit}")
        paths = plot_scores(scores, out_dir, labels=labels, streams=stream or None, limit=limit)
    except StreamrnnError as exc:
        _fail(exc)
    _say(f"wrote {len(paths)} PNG files to {out_dir}")


@app.command()
def daemon(bootstrap: str = typer.Option(None, help="Kafka bootstrap HOST:PORT[,HOST:PORT]."),
           input: str = typer.Option(None, "--input", help="Input topic(s), comma-separated."),  # noqa: A002
           alerts: str = typer.Option(None, help="Alerts topic."),
           model: str = typer.Option(None, help="Model file (reloaded when it changes)."),
           group: str = typer.Option(None, help="Consumer group id."),
           state_dir: str = typer.Option(None, "--state-dir", help="Directory for local state snapshots."),
           config: Path = typer.Option(None, "--config", help="TOML file of settings (deploy/daemon.toml is a commented example)."),
           settings: list[str] = typer.Option([], "--set", help="Any other setting as NAME=VALUE (repeatable): NAME is a key of the TOML file, "
                                                       "e.g. metrics_port=9100.")) -> None:
    """Run the Kafka scoring daemon (settings: TOML < STREAMRNN_* environment < flags)."""
    from daemon.cli import build_config

    try:
        cfg = build_config(config=str(config) if config else None, settings=settings, bootstrap=bootstrap,
                           input=input, alerts=alerts, model=model, group=group, state_dir=state_dir)
        from daemon.loop import run_daemon

        code = run_daemon(cfg, exit_on_overrun=True)
    except StreamrnnError as exc:
        _fail(exc)
    raise typer.Exit(code=code)


@app.command()
def broker(log: Path = typer.Option(None, help="File for the broker's own output.")) -> None:
    """Start the development broker (Tansu) on a free loopback port; print its address; Ctrl-C stops it."""
    from daemon.broker import serve_forever, start_broker

    try:
        if log is not None:
            _check_writable(log, "--log")
        b = start_broker(log=str(log) if log else None)
    except StreamrnnError as exc:
        _fail(exc)
    print(b.bootstrap, flush=True)
    serve_forever(b)


def _check_writable(path: Path, flag: str) -> None:
    """Open ``path`` for appending (creating it), so a bad path fails before work starts."""
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise StreamrnnError(f"{flag} {path}: cannot write it ({exc.strerror})") from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
