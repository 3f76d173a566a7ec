"""Replay history through the Detector: back-testing on Parquet/CSV files.

The input is read in one global time order (:func:`streamrnn.data.iter_events`, which
merges files), scored batch by batch by the same :class:`~streamrnn.detector.Detector` the
daemon runs, and written incrementally: memory stays bounded by a few batches however long
the history. Because the event order and the batch cuts do not depend on how the input is
split into files, and the Detector's results do not depend on batching, the output is the
same for any split of the same events.

Or, with :func:`replay_to_kafka`, the events are produced to a Kafka topic (keyed by
stream) at a multiple of their original pace, for demos and load tests.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from streamrnn.alerts import Alert, alerts_to_arrow
from streamrnn.compiling import compile_clock, on_first_compile
from streamrnn.data import (DataError, EventBatch, Schema, check_output_names, check_outputs, data_notes,
                            iter_events, open_source, parquet_writer, write_parquet, write_whole)
from streamrnn.errors import StreamrnnError
from streamrnn.model import Model

#: Events per Detector call: large enough to amortise per-call costs, small enough for caches.
DEFAULT_BATCH_ROWS = 65536


class ReplayError(StreamrnnError):
    """A replay that cannot run: features the model does not know, an unwritable output."""


@dataclass
class ReplayResult:
    """What a replay did. ``alerts`` are the open and close records, in event order."""

    alerts: list[Alert]
    counters: dict[str, int]
    n_events: int
    seconds: float
    n_streams: int = 0
    scores_path: Path | None = None
    alerts_path: Path | None = None
    input_stats: dict[str, Any] = field(default_factory=dict)
    compile_seconds: float = 0.0  # of ``seconds``: Numba compiling kernels (a cold cache's first run)

    @property
    def events_per_second(self) -> float:
        """Events over the seconds spent other than compiling kernels."""
        busy = self.seconds - self.compile_seconds
        return self.n_events / busy if busy > 0 else float("nan")

    @property
    def n_alerts(self) -> int:
        """Alert episodes opened."""
        return sum(1 for a in self.alerts if a.kind == "open")


def scores_schema(features: Sequence[str]) -> pa.Schema:
    """The SCORES file schema: stream, ts, the features, pred_<feature>, score, alert."""
    return pa.schema([("stream", pa.string()), ("ts", pa.timestamp("ms", tz="UTC"))]
                     + [(f, pa.float64()) for f in features]
                     + [(f"pred_{f}", pa.float64()) for f in features]
                     + [("score", pa.float64()), ("alert", pa.bool_())])


def scores_table(batch: EventBatch, prediction: np.ndarray, score: np.ndarray, alert: np.ndarray,
                 schema: pa.Schema, stream_ids: pa.Array | None = None) -> pa.Table:
    """One SCORES row per event of ``batch``; ``stream_ids``: its ids already as an Arrow
    string array (saves converting them again)."""
    d = batch.values.shape[1]
    cols = [stream_ids if stream_ids is not None else pa.array(batch.stream_ids, pa.string()),
            pa.array(batch.ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC"))]
    cols += [pa.array(batch.values[:, j], pa.float64()) for j in range(d)]
    cols += [pa.array(np.asarray(prediction[:, j], np.float64)) for j in range(d)]
    cols += [pa.array(np.asarray(score, np.float64)), pa.array(np.asarray(alert, bool))]
    return pa.Table.from_arrays(cols, schema=schema)


def load_model(model: Model | str | os.PathLike) -> Model:
    """A Model, loading it when given a path."""
    return model if isinstance(model, Model) else Model.load(model)


def schema_for(model: Model | None, schema: Schema | None) -> Schema:
    """The input mapping: ``schema`` with its features defaulting to the model's.

    A ``--time-delta`` model's "dt" is derived by the Detector, so it is no column of the
    input; a mapping that still names a column for it (the earlier rule) has that one dropped.
    """
    from streamrnn.detector import input_features

    schema = schema or Schema()
    if model is None:
        return schema
    names = tuple(input_features(model))
    if schema.features is None:
        return Schema(schema.stream_col, schema.time_col, names, schema.stream_id)
    mapped = tuple(schema.features)
    if len(mapped) == len(model.feature_names) > len(names):
        return Schema(schema.stream_col, schema.time_col, mapped[:len(names)], schema.stream_id)
    if len(mapped) != len(names):
        derived = " ('dt' is derived from the timestamps)" if len(names) < len(model.feature_names) else ""
        raise ReplayError(f"the model takes {len(names)} features ({', '.join(names)}){derived}; "
                          f"{len(mapped)} were mapped ({', '.join(mapped)})")
    return schema


class _Progress:
    """A rich progress bar over input rows, or nothing."""

    def __init__(self, enabled: bool, total: int, label: str):
        self._bar = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task(label, total=total, rate="")
            self._label = label
            self._t0 = time.perf_counter()
            self._done = 0

    def __enter__(self) -> "_Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def compiling(self) -> None:
        """Say why the bar stands still: Numba compiles before the first batch is scored."""
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self._label}: compiling kernels, first run only")

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._done += n
            rate = self._done / max(time.perf_counter() - self._t0, 1e-9)
            self._bar.update(self._task, advance=n, rate=f"{rate:,.0f} events/s", description=self._label)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def _prefetch(it: Iterator[EventBatch], depth: int = 2) -> Iterator[EventBatch]:
    """Read the next batches on a thread while the caller scores this one (Arrow reading
    and sorting release the GIL, so it overlaps with the kernels)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for b in it:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(exc)

    t = threading.Thread(target=run, name="replay-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join()


def _with_arrow_ids(it: Iterator[EventBatch]) -> Iterator[tuple[EventBatch, pa.Array]]:
    """Each batch with its ids as an Arrow string array, for the stream table and the SCORES
    file alike. Run inside ``_prefetch``, the conversion overlaps with the kernels (which
    release the GIL) instead of delaying the next batch."""
    for b in it:
        yield b, pa.array(b.stream_ids, pa.string())


class _AtomicParquet:
    """A ParquetWriter onto ``<path>.partial``, renamed to ``path`` only when complete.

    Tables are encoded and written on a background thread (Parquet encoding releases the
    GIL), so writing overlaps with scoring the next batch; :meth:`write_later` builds the
    table there too.
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Dictionary encoding only where values repeat (stream ids): trying it on the
            # float columns costs more than the rest of the write and saves nothing.
            self.writer = parquet_writer(self.tmp, schema, compression="zstd", use_dictionary=["stream"])
        except OSError as exc:
            raise ReplayError(f"cannot write {self.path}: {exc}") from None
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="replay-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            table = self._queue.get()
            if table is None:
                return
            if self._error is None:
                try:
                    if callable(table):
                        table = table()
                    self.writer.write_table(table, row_group_size=1 << 20)
                except BaseException as exc:  # raised on the caller's thread
                    self._error = exc

    def write(self, table: pa.Table) -> None:
        self._raise()
        self._queue.put(table)

    def write_later(self, make: Callable[[], pa.Table]) -> None:
        """Write the table ``make()`` returns, calling it on the writer thread (its inputs
        must not change afterwards)."""
        self._raise()
        self._queue.put(make)

    def _raise(self) -> None:
        if self._error is not None:
            raise ReplayError(f"cannot write {self.path}: {self._error}") from self._error

    def _finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.writer.close()

    def commit(self) -> None:
        self._finish()
        self._raise()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._finish()
        finally:
            self.tmp.unlink(missing_ok=True)


def replay(paths: str | os.PathLike | Sequence[str | os.PathLike], model: Model | str | os.PathLike,
           out: str | os.PathLike | None = None, alerts_out: str | os.PathLike | None = None, *,
           schema: Schema | None = None, batch_rows: int = DEFAULT_BATCH_ROWS, config=None,
           progress: bool = True, on_batch: Callable[[EventBatch, Any], None] | None = None,
           detector=None) -> ReplayResult:
    """Run the Detector over history in global time order.

    Parameters
    ----------
    paths : Parquet/CSV files or directories (merged in time order).
    model : a :class:`~streamrnn.model.Model` or a model file path.
    out : SCORES Parquet path (one row per event: stream, ts, the features,
        ``pred_<feature>``, score, alert), written incrementally; ``None`` writes nothing.
    alerts_out : Parquet path for the alert records (:data:`streamrnn.alerts.ALERT_SCHEMA`).
    schema : the column mapping; features default to the model's feature names.
    batch_rows : events per Detector call.
    config : a :class:`streamrnn.scoring.ScoringConfig` (default: from the model).
    progress : show a progress bar.
    on_batch : called with each input batch and its ScoredBatch (for callers that want
        more than the files, e.g. the demo); the ScoredBatch's ``stream_ids`` are the
        batch's ids as an Arrow string array.
    detector : an existing Detector to continue (its model and config are used).
    """
    from streamrnn.detector import Detector

    if batch_rows < 1:
        raise ReplayError(f"batch_rows must be at least 1, not {batch_rows}")
    check_outputs({"--out": out, "--alerts-out": alerts_out}, paths)
    check_output_names({"--out": out, "--alerts-out": alerts_out}, "Parquet", "replay writes Parquet", ".parquet")
    model = detector.model if detector is not None else load_model(model)
    schema = schema_for(model, schema)
    source = open_source(paths, schema)
    det = detector if detector is not None else Detector(model, config=config)
    out_schema = scores_schema(source.features)  # the input's column names
    events = iter_events(source, batch_rows)
    writer = _AtomicParquet(Path(out), out_schema) if out is not None else None
    alerts: list[Alert] = []
    n = 0
    t0 = time.perf_counter()
    try:
        with _Progress(progress, source.n_rows, "replay") as bar, on_first_compile(bar.compiling), \
                compile_clock() as compiled:
            for batch, ids in _prefetch(_with_arrow_ids(events)):
                res = det.process(ids, batch.values, batch.ts)
                alerts.extend(res.alerts)
                if writer is not None:
                    writer.write_later(partial(scores_table, batch, res.prediction, res.score, res.alert,
                                               out_schema, ids))
                if on_batch is not None:
                    on_batch(batch, res)
                n += len(batch)
                bar.advance(len(batch))
        if writer is not None:
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    seconds = time.perf_counter() - t0
    alerts_path = None
    if alerts_out is not None:
        alerts_path = Path(alerts_out)
        _write_alerts(alerts_path, alerts)
    counters = dict(det.counters)
    for key in _INPUT_COUNTERS:
        counters[key] = int(events.stats.get(key, 0))
    return ReplayResult(alerts=alerts, counters=counters, n_events=n, seconds=seconds,
                        compile_seconds=compiled.seconds, n_streams=len(det.table), scores_path=Path(out) if out is not None else None,
                        alerts_path=alerts_path, input_stats=dict(events.stats))


def _write_alerts(path: Path, alerts: list[Alert]) -> None:
    table = alerts_to_arrow(alerts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, lambda tmp: write_parquet(table, tmp))
    except OSError as exc:
        raise ReplayError(f"cannot write {path}: {exc}") from None


def replay_to_kafka(paths: str | os.PathLike | Sequence[str | os.PathLike], bootstrap: str, topic: str, *,
                    model: Model | str | os.PathLike | None = None, schema: Schema | None = None,
                    speed: float | None = None, batch_rows: int = DEFAULT_BATCH_ROWS,
                    progress: bool = True, **producer_options) -> Any:
    """Produce the history's events to ``topic`` in time order, keyed by stream.

    ``speed`` X replays at X times the original pace (``None``: as fast as possible). With a
    ``model``, its feature names select the columns. Returns what
    ``daemon.producer.produce_events`` returns (its delivery report), with ``input_stats``
    saying what reading the files did (duplicates dropped, rows merged; see ``iter_events``).
    """
    from daemon.producer import produce_events  # Kafka stays out of the library's import path
    from streamrnn.detector import input_features

    model = load_model(model) if model is not None else None
    schema = schema_for(model, schema)
    source = open_source(paths, schema)
    # The daemon decodes values by the model's feature names (but a derived dt); without a
    # model, the columns'.
    names = list(input_features(model)) if model is not None else list(source.features)
    _check_bootstrap(bootstrap)
    if speed is not None and not speed > 0:
        raise ReplayError(f"--speed must be positive, not {speed}")

    def counted(it: Iterator[EventBatch], bar: _Progress) -> Iterator[EventBatch]:
        for b in it:
            yield b
            bar.advance(len(b))

    events = iter_events(source, batch_rows)
    with _Progress(progress, source.n_rows, f"to {topic}") as bar:
        sent = produce_events(bootstrap, topic, counted(events, bar), speed=speed, feature_names=names,
                              **producer_options)
    sent.input_stats = dict(events.stats)
    return sent


def _check_bootstrap(bootstrap: str) -> None:
    host, _, port = bootstrap.rpartition(":")
    if not host or not port.isdigit():
        raise ReplayError(f"--to-kafka takes HOST:PORT, not {bootstrap!r}")


#: Counts of what reading the input did (before scoring), reported as train reports them.
_INPUT_COUNTERS = ("duplicates_dropped", "conflicts_merged")


def _compiled_note(seconds: float) -> str:
    """What of a run's time went to compiling kernels, when it is worth a mention."""
    return f", of which {seconds:.1f} s compiling kernels, first run only" if seconds >= 0.05 else ""


def summary_lines(result: ReplayResult) -> list[str]:
    """Human-readable summary of a replay."""
    c = result.counters
    lines = [f"events {result.n_events:,}  streams {result.n_streams:,}  alert episodes {result.n_alerts:,}  "
             f"{result.events_per_second:,.0f} events/s "
             f"({result.seconds:.2f} s{_compiled_note(result.compile_seconds)})"]
    notes = data_notes({**result.input_stats, **{k: c.get(k, 0) for k in _INPUT_COUNTERS}})
    if notes is not None:
        lines.append(notes)
    shown = {k: v for k, v in c.items() if v and k not in _INPUT_COUNTERS}
    if shown:
        lines.append("counters  " + "  ".join(f"{k} {v:,}" for k, v in shown.items()))
    if result.scores_path is not None:
        lines.append(f"scores -> {result.scores_path}")
    if result.alerts_path is not None:
        lines.append(f"alerts -> {result.alerts_path}")
    return lines


__all__ = ["ReplayResult", "ReplayError", "replay", "replay_to_kafka", "scores_schema", "scores_table",
           "summary_lines", "DataError"]
