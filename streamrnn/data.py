"""Reading history for the trainer and for replay.

Parquet files, directories, hive-partitioned datasets and CSV (``.csv``/``.csv.gz``) are read
with ``pyarrow.dataset`` in record batches and mapped onto one event layout: a stream id, a
time in epoch milliseconds and a row of float64 features in raw units (NaN = missing).

Two ways through the data:

- :func:`iter_events` for replay: every event once, in one global time order that does not
  depend on how the input was split into files or batches.
- :func:`load_history` for training: per-stream sequences, sorted, de-duplicated, with a
  stated missing-value and gap policy; then :func:`split_by_time`, :func:`fit_scaler` on the
  training part only, and :class:`WindowSampler` for bounded-memory training windows.
  :func:`iter_history` yields the same sequences in parts of whole streams when the history
  does not fit in memory (``fit_scaler`` accepts those parts too).

Every user mistake (no files, a missing or mistyped column, an all-NaN feature, ...) raises
:class:`DataError` with one message that names the file and the column.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from streamrnn.errors import StreamrnnError

__all__ = [
    "DataError", "Schema", "EventBatch", "Source", "open_source", "check_outputs", "write_whole", "iter_events",
    "data_notes", "DATA_NOTES", "blank_id_error", "write_parquet", "parquet_writer", "read_parquet",
    "read_error", "did_you_mean", "check_output_names",
    "EventIterator", "History", "load_history", "iter_history", "stream_counts", "Split",
    "split_by_time", "Scaler", "fit_scaler", "WindowSampler",
]

_PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
_CSV_SUFFIXES = (".csv", ".csv.gz")
_MISSING_POLICIES = ("ffill", "drop", "zero")
_TIME_NAMES = ("timestamp", "time", "datetime", "date", "ts", "event_time", "@timestamp")
_TS_TO_MS = {"s": (1000, 1), "ms": (1, 1), "us": (1, 1000), "ns": (1, 1_000_000)}


class DataError(StreamrnnError):
    """Input data that cannot be used: no files, a bad file, a missing or mistyped column."""


@dataclass(frozen=True)
class Schema:
    """How the columns of the input map onto events.

    ``features=None`` takes every other numeric column (integer, floating or decimal, not a
    hive partition key). A file without ``stream_col`` holds one stream whose id is
    ``stream_id`` when given, else the file's stem (``cpu.parquet`` -> ``"cpu"``, a hive
    partition key named ``stream_col`` wins over the stem). A stream column with a name other
    than the default ``"stream"`` must exist in every file unless ``stream_id`` is given.
    """

    stream_col: str = "stream"
    time_col: str = "ts"
    features: tuple[str, ...] | None = None
    stream_id: str | None = None

    def __post_init__(self) -> None:
        if self.features is not None:
            object.__setattr__(self, "features", tuple(str(f) for f in self.features))
            if not self.features:
                raise DataError("the list of features is empty")
            dup = sorted({f for f in self.features if self.features.count(f) > 1})
            if dup:
                raise DataError(f"feature {dup[0]!r} is named more than once")
            clash = [f for f in self.features if f in (self.stream_col, self.time_col)]
            if clash:
                raise DataError(f"column {clash[0]!r} cannot be both a feature and the stream or time column")
        if self.stream_col == self.time_col:
            raise DataError(f"stream and time column are both {self.time_col!r}")
        if self.stream_id is not None and not str(self.stream_id):
            raise DataError("the stream id for files without a stream column is empty; give it a name")


@dataclass
class EventBatch:
    """A batch of events, the input of ``Detector.process(stream_ids, values, ts)``."""

    stream_ids: np.ndarray  # (E,) object array of str
    ts: np.ndarray  # (E,) int64 epoch ms
    values: np.ndarray  # (E, D) float64 raw units, NaN = missing

    def __len__(self) -> int:
        return int(self.ts.shape[0])


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class _File:
    """One input file and what open_source learnt about it."""

    path: Path
    fmt: str  # "parquet" | "csv"
    partition: tuple[tuple[str, str], ...]  # hive keys parsed from the directory path
    columns: tuple[tuple[str, pa.DataType], ...]  # physical columns
    n_rows: int

    @property
    def types(self) -> dict[str, pa.DataType]:
        return dict(self.columns)

    @property
    def keys(self) -> dict[str, str]:
        return dict(self.partition)

    @property
    def stem(self) -> str:
        name = self.path.name
        for suffix in _CSV_SUFFIXES[::-1] + _PARQUET_SUFFIXES:
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return self.path.stem


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return None


def _hive_keys(root: Path, path: Path) -> tuple[tuple[str, str], ...]:
    """``key=value`` directory names between ``root`` and the file, outermost first."""
    keys = []
    for part in path.relative_to(root).parts[:-1]:
        if "=" in part:
            k, v = part.split("=", 1)
            keys.append((unquote(k), unquote(v)))
    return tuple(keys)


def did_you_mean(path: Path) -> str:
    """For a path that does not exist: "; did you mean ...?" naming the entries beside it
    that it most likely meant (``history`` -> ``history.parquet``), or ""."""
    import difflib

    try:
        near = sorted(e.name for e in path.parent.iterdir())
    except OSError:
        return ""
    name = path.name
    if not name:
        return ""
    # The name without its suffix, then a prefix of a name, then a near spelling.
    ranked = ([n for n in near if n.split(".", 1)[0] == name] + [n for n in near if n.startswith(name)]
              + difflib.get_close_matches(name, near, n=3, cutoff=0.8))
    shown = [str(path.parent / n) for n in dict.fromkeys(ranked)][:3]
    return f"; did you mean {' or '.join(shown)}?" if shown else ""


def _expand(paths: Iterable[str | os.PathLike]) -> list[tuple[Path, str, tuple]]:
    """Files named directly or found under directories: (path, format, hive keys)."""
    out: list[tuple[Path, str, tuple]] = []
    seen: set[Path] = set()
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                # Hidden and underscore entries are metadata (_SUCCESS, _metadata, .crc).
                dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
                for name in sorted(filenames):
                    f = Path(dirpath) / name
                    fmt = _format_of(f)
                    if fmt and not name.startswith((".", "_")):
                        found.append((f, fmt, _hive_keys(path, f)))
            if not found:
                raise DataError(f"no Parquet or CSV files (.parquet, .csv, .csv.gz) under {path}")
            files = found
        elif path.is_file():
            files = [(path, _format_of(path) or "parquet", ())]
        else:
            raise DataError(f"no such file or directory: {path}{did_you_mean(path)}")
        for f, fmt, keys in files:
            real = f.resolve()
            if real not in seen:
                seen.add(real)
                out.append((f, fmt, keys))
    return out


def _csv_format(column_types: dict[str, pa.DataType] | None = None) -> ds.CsvFileFormat:
    return ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(column_types=column_types or {},
                                                                 strings_can_be_null=True))


def _dataset(path: Path, fmt: str, column_types: dict[str, pa.DataType] | None = None,
             dictionary_columns: Sequence[str] = ()) -> ds.Dataset:
    if fmt == "csv":
        file_format: Any = _csv_format(column_types)
    else:
        # Stream ids read as a dictionary: one Python string per distinct id, not per row.
        file_format = ds.ParquetFileFormat(
            read_options=ds.ParquetReadOptions(dictionary_columns=list(dictionary_columns)),
            default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))
    try:
        return ds.dataset(str(path), format=file_format)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {path} as {'CSV' if fmt == 'csv' else 'Parquet'}: {exc}") from None


def _inspect(path: Path, fmt: str, keys: tuple, schema: Schema) -> _File:
    dataset = _dataset(path, fmt, {schema.stream_col: pa.string()} if fmt == "csv" else None)
    try:
        n_rows = dataset.count_rows()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    cols = tuple((f.name, f.type) for f in dataset.schema)
    return _File(path, fmt, keys, cols, int(n_rows))


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _auto_features(files: list[_File], schema: Schema) -> list[str]:
    """Every numeric column except stream, time and partition keys, in first-seen order."""
    skip = {schema.stream_col, schema.time_col}
    for f in files:
        skip.update(f.keys)
    order: list[str] = []
    kinds: dict[str, str] = {}
    where: dict[str, Path] = {}
    for f in files:
        for name, t in f.columns:
            if name in skip or pa.types.is_null(t):
                continue
            kind = "numeric" if _is_numeric(t) else str(t)
            if name not in kinds:
                order.append(name)
                kinds[name], where[name] = kind, f.path
            elif (kind == "numeric") != (kinds[name] == "numeric"):
                num, other = (where[name], f.path) if kinds[name] == "numeric" else (f.path, where[name])
                raise DataError(f"column {name!r} is numeric in {num} but not in {other}; "
                                f"fix the file or name the features explicitly")
    return [n for n in order if kinds[n] == "numeric"]


def _check_file(f: _File, schema: Schema, features: list[str], need_stream: bool) -> None:
    types, keys = f.types, f.keys
    if schema.time_col not in types:
        timelike = [n for n, t in f.columns if pa.types.is_timestamp(t) or n.lower() in _TIME_NAMES]
        hint = f"; is it {timelike[0]!r}? pass --time-col {timelike[0]}" if timelike else ""
        raise DataError(f"{f.path}: time column {schema.time_col!r} not found "
                        f"(columns: {', '.join(types) or 'none'}){hint}")
    t = types[schema.time_col]
    if not (pa.types.is_timestamp(t) or pa.types.is_integer(t)):
        hint = ""
        if f.fmt == "csv" and _is_text(t):
            first = _first_value(f, schema.time_col)
            hint = (f" (CSV times are read as ISO 8601, like 2026-01-01T00:00:00Z"
                    + (f"; line 2 holds {first!r})" if first is not None else ")"))
        raise DataError(f"{f.path}: time column {schema.time_col!r} is {t}; it must be a timestamp "
                        f"or an integer in epoch milliseconds{hint}")
    if schema.stream_col in types:
        st = types[schema.stream_col]
        if not (_is_text(st) or pa.types.is_integer(st)):
            raise DataError(f"{f.path}: stream column {schema.stream_col!r} is {st}; it must be text or integer")
    elif need_stream and schema.stream_col not in keys:
        raise DataError(f"{f.path}: stream column {schema.stream_col!r} not found "
                        f"(columns: {', '.join(types)})")
    for name in features:
        if name in types:
            ft = types[name]
            if not (_is_numeric(ft) or pa.types.is_null(ft) or pa.types.is_boolean(ft)):
                raise DataError(f"{f.path}: feature column {name!r} is {ft}{_csv_hint(f, name, ft)}, "
                                f"not numeric")
        elif name not in keys:
            raise DataError(f"{f.path}: feature column {name!r} not found (columns: {', '.join(types)})")


def open_source(paths: str | os.PathLike | Sequence[str | os.PathLike], schema: Schema = Schema()) -> "Source":
    """Open Parquet/CSV files and directories as one event source and validate it.

    Reads only schemas and row counts (CSV files are scanned once to count rows). Raises
    :class:`DataError` for no files, no rows, a missing stream/time/feature column, a
    non-numeric feature, a time column that is neither a timestamp nor an integer, or no
    feature column at all.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise DataError("no input paths given")
    files = [_inspect(p, fmt, keys, schema) for p, fmt, keys in _expand(paths)]
    if sum(f.n_rows for f in files) == 0:
        names = ", ".join(str(f.path) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise DataError(f"no rows in {names}")
    files = [f for f in files if f.n_rows > 0]
    has_stream = [schema.stream_col in f.types or schema.stream_col in f.keys for f in files]
    if any(has_stream) and not all(has_stream) and schema.stream_id is None:
        with_col = files[has_stream.index(True)].path
        without = files[has_stream.index(False)].path
        raise DataError(f"stream column {schema.stream_col!r} is in {with_col} but not in {without}")
    need_stream = schema.stream_col != Schema.stream_col and schema.stream_id is None
    if not any(has_stream) and not need_stream and schema.stream_id is None:
        for f in files:
            _check_single_stream(f, schema)
    features = list(schema.features) if schema.features is not None else _auto_features(files, schema)
    if schema.features is None:
        _check_same_features(files, features)
    for f in files:
        _check_file(f, schema, features, need_stream)
    if not features:
        raise DataError(f"no numeric feature column in {files[0].path}: "
                        f"{_not_numeric(files[0], schema)}")
    return Source(files, schema, features, [Path(p) for p in paths])


def _check_same_features(files: list[_File], features: list[str]) -> None:
    """Features found by type are the union over the files: name a file that lacks one."""
    for name in features:
        has = [name in f.types or name in f.keys for f in files]
        if not all(has):
            raise DataError(f"feature column {name!r} is in {files[has.index(True)].path} but not in "
                            f"{files[has.index(False)].path}; give the files the same columns or "
                            f"name the features with --features")


def _check_single_stream(f: _File, schema: Schema) -> None:
    """A file without the stream column is one stream; one with a text column is much more
    likely a fleet whose id column has another name, which as one stream would interleave
    every stream's events into one sequence."""
    text = [n for n, t in f.columns
            if _is_text(t) and n not in (schema.time_col, *f.keys) and n.lower() not in _TIME_NAMES]
    if text:
        raise DataError(f"{f.path}: no stream column {schema.stream_col!r}, but text column(s) "
                        f"{', '.join(map(repr, text))}: if {text[0]!r} names the streams, pass "
                        f"--stream-col {text[0]}; if the file is one stream, name it with --stream-id NAME")


def _not_numeric(f: _File, schema: Schema) -> str:
    """What the candidate feature columns of ``f`` are instead of numbers."""
    skip = {schema.stream_col, schema.time_col, *f.keys}
    others = [(n, t) for n, t in f.columns if n not in skip]
    if not others:
        return f"it has only the stream and time columns ({', '.join(f.types)})"
    parts = []
    for name, t in others:
        parts.append(f"{name!r} is {t}{_csv_hint(f, name, t)}")
    return "; ".join(parts)


def _csv_hint(f: _File, name: str, t: pa.DataType) -> str:
    """Where a CSV column that should hold numbers holds text, e.g. " (line 7 holds 'abc')"."""
    bad = _first_non_number(f, name) if f.fmt == "csv" and _is_text(t) else None
    return f" (line {bad[0] + 2} holds {bad[1]!r})" if bad else ""


_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$|^\s*[-+]?(inf|Inf|INF|nan|NaN|NAN)\s*$"


def _first_value(f: _File, name: str) -> str | None:
    """The first row's value of a CSV column, as text."""
    try:
        for batch in _dataset(f.path, "csv", {name: pa.string()}).to_batches(columns=[name]):
            if len(batch):
                return batch.column(0)[0].as_py()
    except (pa.ArrowException, OSError):
        return None
    return None


def _first_non_number(f: _File, name: str) -> tuple[int, str] | None:
    """(data row from 0, value) of the first value that made a CSV column text, if found."""
    dataset = _dataset(f.path, "csv", {name: pa.string()})
    row = 0
    try:
        for batch in dataset.to_batches(columns=[name]):
            col = batch.column(0)
            ok = pc.or_kleene(pc.match_substring_regex(col, _NUMBER), pc.equal(pc.utf8_length(col), 0))
            bad = np.flatnonzero(~ok.fill_null(True).to_numpy(zero_copy_only=False))
            if len(bad):
                return row + int(bad[0]), col[int(bad[0])].as_py()
            row += len(col)
    except (pa.ArrowException, OSError):
        return None
    return None


# Parquet files this tool writes carry a CRC per page and every Parquet read verifies it, so
# a flipped bit on disk is an error, not a wrong number. Cost measured on 1M rows: 8-30 % of
# the bare Arrow read's CPU (about 10-25 ms per 25 MB), lost in the noise of a whole replay
# (1.4 s CPU) or evaluate (1.7 s CPU).
_CHECKSUM_FAILED = "checksum verification failed"


def write_parquet(table: pa.Table, path: str | os.PathLike, **options: Any) -> None:
    """``pq.write_table`` with page checksums."""
    pq.write_table(table, path, write_page_checksum=True, **options)


def parquet_writer(path: str | os.PathLike, schema: pa.Schema, **options: Any) -> pq.ParquetWriter:
    """``pq.ParquetWriter`` with page checksums."""
    return pq.ParquetWriter(path, schema, write_page_checksum=True, **options)


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """``pq.read_table`` verifying page checksums; a file that cannot be read raises
    :class:`DataError` naming it."""
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise read_error(path, exc) from None


def read_error(path: str | os.PathLike, exc: BaseException) -> DataError:
    """The error for a file Arrow failed to read; a page failing its checksum says so plainly."""
    if _CHECKSUM_FAILED in str(exc).lower():
        return DataError(f"{path} is damaged: a Parquet page fails its checksum ({exc}); the file "
                         f"changed after it was written: restore it from a copy or write it again")
    return DataError(f"cannot read {path}: {exc}")


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` beside ``path``, then rename: ``path`` is the old file or the whole new
    one, and an interrupted write (Ctrl-C, a full disk) leaves no partial file behind."""
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: Names that promise a format, by what the tool writes in it.
_NAMED_FORMATS = {"Parquet": _PARQUET_SUFFIXES, "text": (".csv", ".csv.gz", ".tsv", ".txt", ".json", ".jsonl"),
                  "model": (".safetensors",), "PNG": (".png",), "checkpoint": (".npz",)}


def check_output_names(outputs: dict[str, str | os.PathLike | None], writes: str, what: str,
                       suffix: str) -> None:
    """Refuse an output named like another format than the ``writes`` one (a model saved as
    ``out.parquet``, Parquet bytes under ``scores.csv``): the next command would read it by
    its name and fail far from the cause. ``what`` says what the command writes."""
    for flag, p in outputs.items():
        name = Path(p).name.lower() if p is not None else ""
        if any(name.endswith(sfx) for kind, sfxs in _NAMED_FORMATS.items() if kind != writes for sfx in sfxs):
            raise DataError(f"{flag} {p}: {what}; give the file a {suffix} name")


def check_outputs(outputs: dict[str, str | os.PathLike | None],
                  inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
    """Refuse output paths that cannot be files or that would replace an input file.

    ``outputs`` maps the flag that named each path (for the message) to the path (None: not
    asked for). Run before the work, so a long run neither ends on a typo nor writes its
    result over the data it read.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    seen: dict[Path, str] = {}
    for flag, p in outputs.items():
        if p is not None:
            other = seen.setdefault(Path(p).resolve(), flag)
            if other != flag:
                raise DataError(f"{other} and {flag} are both {p}; give each output its own name")
    read = {f.resolve() for f, _, _ in _expand(inputs)}
    dirs = [Path(p).resolve() for p in inputs if Path(p).is_dir()]
    for flag, p in outputs.items():
        if p is None:
            continue
        path = Path(p)
        if path.is_dir():
            raise DataError(f"{flag} {path} is a directory; give a file name")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise DataError(f"{flag} {path}: {folder} is a file, not a directory")
        if path.resolve() in read:
            raise DataError(f"{flag} {path} is one of the input files; writing it would replace "
                            f"the data; choose another name")
        inside = next((d for d in dirs if d in path.resolve().parents), None)
        if inside is not None and _format_of(path) is not None:
            raise DataError(f"{flag} {path} is inside the input directory {inside}: the next run over "
                            f"it would read this output as data; write it elsewhere")


# --------------------------------------------------------------------------- reading


def _time_ms(arr: pa.Array, path: Path, col: str) -> np.ndarray:
    if arr.null_count:
        raise DataError(f"{path}: time column {col!r} has {arr.null_count} empty values")
    t = arr.type
    if pa.types.is_timestamp(t):
        mul, div = _TS_TO_MS[t.unit]
        raw = arr.cast(pa.timestamp(t.unit)).cast(pa.int64()).to_numpy(zero_copy_only=False)
        return raw * mul if div == 1 else np.floor_divide(raw, div)
    if pa.types.is_uint64(t) and len(arr) and pc.max(arr).as_py() > np.iinfo(np.int64).max:
        raise DataError(f"{path}: time column {col!r} has values beyond int64 epoch milliseconds")
    ms = arr.cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    refuse_epoch_seconds(ms, path, col)
    return ms


#: Integer times in [1e9, 1e11) read as milliseconds fall in 1970-01-12..1973-03-03; as
#: seconds they are 2001-09-09..5138, where epoch-second clocks are: refused, not guessed.
EPOCH_SECONDS_RANGE = (1_000_000_000, 100_000_000_000)


def refuse_epoch_seconds(ms: np.ndarray, path: Path | str, col: str) -> None:
    """Raise when integer times ``ms`` are most likely epoch seconds (see EPOCH_SECONDS_RANGE)."""
    if not len(ms):
        return
    lo, hi = int(ms.min()), int(ms.max())
    if EPOCH_SECONDS_RANGE[0] <= lo and hi < EPOCH_SECONDS_RANGE[1]:
        import datetime as dt

        as_s = dt.datetime.fromtimestamp(lo, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        raise DataError(f"{path}: time column {col!r} looks like epoch seconds ({lo} = {as_s} UTC as "
                        f"seconds, a day in January 1970 as milliseconds); integer times must be epoch "
                        f"milliseconds: multiply them by 1000 or store a timestamp column")


class _Names:
    """Interns stream ids: each distinct id gets a small integer code, once per Source.

    Chunks carry codes instead of strings, so sorting, comparing and gathering rows stay in
    NumPy; strings are materialised only per distinct id (and per output row by a gather).
    """

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._arr = np.empty(1024, dtype=object)
        # Replay may read in a prefetch thread while another reader of the Source runs.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._index)

    def codes(self, names: Sequence[str]) -> np.ndarray:
        out = np.empty(len(names), np.int64)
        with self._lock:
            index = self._index
            for i, name in enumerate(names):
                code = index.get(name)
                if code is None:
                    code = len(index)
                    if code == len(self._arr):
                        self._arr = np.concatenate([self._arr, np.empty(len(self._arr), dtype=object)])
                    self._arr[code] = name
                    index[name] = code
                out[i] = code
        return out

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """Object array of the ids for ``codes`` (codes handed out earlier)."""
        return self._arr[codes]

    def ranks(self, codes: np.ndarray) -> tuple[np.ndarray, int]:
        """Per row, the rank of its id in code-point (= UTF-8 byte) order among the ids
        present, and the number of distinct ids present."""
        if 8 * len(codes) < len(self._index):
            # Few rows among many known ids: work on the ids present only.
            uniq, inv = np.unique(codes, return_inverse=True)
            order = pc.array_sort_indices(pa.array(self.lookup(uniq), pa.string())).to_numpy()
            rank = np.empty(len(uniq), np.int64)
            rank[order] = np.arange(len(uniq))
            return rank[inv], len(uniq)
        n_known = int(codes.max()) + 1
        present = np.zeros(n_known, bool)
        present[codes] = True
        uniq = np.flatnonzero(present)
        order = pc.array_sort_indices(pa.array(self.lookup(uniq), pa.string())).to_numpy()
        rank_of_code = np.zeros(n_known, np.int64)
        rank_of_code[uniq[order]] = np.arange(len(uniq))
        return rank_of_code[codes], len(uniq)


def _blank(ids: pa.Array) -> pa.Array:
    """Per row: the stream id is null or the empty string."""
    text = ids.dictionary_decode() if pa.types.is_dictionary(ids.type) else ids
    return pc.fill_null(pc.equal(pc.utf8_length(text.cast(pa.string())), 0), True)


def blank_id_error(path: Path | str, col: str, batches: Iterable[pa.Array], csv: bool = False,
                   shown: int = 5) -> DataError | None:
    """The error for rows without a stream id (null or empty) among ``batches`` of one
    file's stream column, in file order; None when every row has one. A ``csv`` file's rows
    are named by their line in the file (the header is line 1), as a text editor shows them.

    Such rows belong to no stream; dropping them would hide a broken export or a wrong
    ``--stream-col``, so train, replay and evaluate refuse the file and name the rows."""
    n_blank = offset = 0
    first = 2 if csv else 1
    rows: list[int] = []
    for ids in batches:
        blank = _blank(ids)
        n = pc.sum(blank).as_py() or 0
        if n and len(rows) < shown:
            rows += (offset + first + np.flatnonzero(np.asarray(blank))[:shown - len(rows)]).tolist()
        n_blank += n
        offset += len(ids)
    if not n_blank:
        return None
    listed = ", ".join(map(str, rows)) + (", ..." if n_blank > len(rows) else "")
    s = "s" if n_blank > 1 else ""
    where = f"line{s} {listed}" if csv else f"row{s} {listed}, counting data rows from 1"
    return DataError(f"{path}: stream column {col!r} is empty or null in {n_blank:,} row{s} ({where}); "
                     f"every row needs a stream id: fill them in or drop those rows")


def _stream_codes(arr: pa.Array, names: _Names) -> np.ndarray | None:
    """Codes of the batch's ids; None when some row has no id (the caller names them)."""
    if arr.null_count:
        return None
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    # Only the distinct ids of the batch become Python strings.
    ids = arr.dictionary.cast(pa.string()).to_pylist()
    if "" in ids and pc.any(_blank(arr)).as_py():  # a file's dictionary may hold unused ids
        return None
    lut = names.codes(ids)
    return lut[arr.indices.to_numpy(zero_copy_only=False)]


def _feature_arr(arr: pa.Array, path: Path, col: str) -> np.ndarray:
    try:
        out = arr.cast(pa.float64())
    except pa.ArrowException as exc:
        raise DataError(f"{path}: feature column {col!r} cannot be read as numbers: {exc}") from None
    if out.null_count:
        out = out.fill_null(np.nan)
    return out.to_numpy(zero_copy_only=False)


@dataclass
class _Chunk:
    """Events with stream ids as codes of the Source's :class:`_Names`."""

    codes: np.ndarray  # (E,) int64
    ts: np.ndarray  # (E,) int64
    values: np.ndarray  # (E, D) float64

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def take(self, idx: np.ndarray | slice) -> "_Chunk":
        return _Chunk(self.codes[idx], self.ts[idx], self.values[idx])

    @staticmethod
    def concat(chunks: list["_Chunk"], d: int) -> "_Chunk":
        if not chunks:
            return _Chunk(np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, d)))
        if len(chunks) == 1:
            return chunks[0]
        return _Chunk(np.concatenate([c.codes for c in chunks]), np.concatenate([c.ts for c in chunks]),
                      np.concatenate([c.values for c in chunks]))


class Source:
    """A validated set of input files. Build it with :func:`open_source`."""

    def __init__(self, files: list[_File], schema: Schema, features: list[str], paths: list[Path]):
        self._files = files
        self.schema = schema
        self.features = features
        self.paths = paths
        self._names = _Names()

    @property
    def files(self) -> list[Path]:
        """Every data file, in storage order."""
        return [f.path for f in self._files]

    @property
    def n_rows(self) -> int:
        """Rows in all files (before de-duplication)."""
        return sum(f.n_rows for f in self._files)

    def __repr__(self) -> str:
        return f"Source({len(self._files)} files, {self.n_rows} rows, features={self.features})"

    def iter_batches(self, batch_rows: int = 65536) -> Iterator[EventBatch]:
        """Every row once, file by file in storage order, at most ``batch_rows`` per batch."""
        for chunk in self._iter_chunks(batch_rows):
            yield self._to_batch(chunk)

    def _to_batch(self, chunk: _Chunk) -> EventBatch:
        return EventBatch(self._names.lookup(chunk.codes), chunk.ts, chunk.values)

    # -- internals shared by iter_events and load_history

    def _iter_chunks(self, batch_rows: int, only: Sequence[str] | None = None) -> Iterator[_Chunk]:
        for f in self._files:
            yield from self._read_file(f, batch_rows, only=only)

    def _const_stream(self, f: _File) -> str | None:
        """The one stream id of a file without a stream column (None if it has one)."""
        s = self.schema
        if s.stream_col in f.types:
            return None
        sid = f.keys.get(s.stream_col, s.stream_id if s.stream_id is not None else f.stem)
        if not sid:
            raise DataError(f"{f.path}: its stream id (partition key {s.stream_col}=) is empty")
        return sid

    def _columns(self, f: _File) -> list[str]:
        types = f.types
        cols = [self.schema.time_col]
        if self.schema.stream_col in types:
            cols.append(self.schema.stream_col)
        return cols + [c for c in self.features if c in types]

    def _read_file(self, f: _File, batch_rows: int, time_only: bool = False,
                   only: Sequence[str] | None = None) -> Iterator[_Chunk]:
        """Chunks of one file; with ``only``, at least the rows of those streams (a file of
        other streams is skipped, and text stream columns are filtered by Arrow)."""
        s = self.schema
        if batch_rows < 1:
            raise DataError(f"batch_rows must be at least 1, not {batch_rows}")
        const_stream = self._const_stream(f)
        if only is not None and const_stream is not None and const_stream not in only:
            return
        types = {s.stream_col: pa.string(), **{c: pa.float64() for c in self.features if c in f.types}}
        dataset = _dataset(f.path, f.fmt, types if f.fmt == "csv" else None, [s.stream_col])
        cols = [s.time_col] if time_only else self._columns(f)
        row_filter = None
        if only is not None and const_stream is None and _is_text(dataset.schema.field(s.stream_col).type):
            row_filter = pc.field(s.stream_col).isin(pa.array(list(only), pa.string()))
        try:
            for rb in dataset.to_batches(columns=cols, batch_size=batch_rows, filter=row_filter):
                for start in range(0, rb.num_rows, batch_rows):
                    yield self._convert(f, rb.slice(start, batch_rows), const_stream, time_only)
        except (pa.ArrowException, OSError) as exc:
            raise read_error(f.path, exc) from None

    def _convert(self, f: _File, rb: pa.RecordBatch, const_stream: str | None, time_only: bool) -> _Chunk:
        s, n = self.schema, rb.num_rows
        ts = _time_ms(rb.column(s.time_col), f.path, s.time_col)
        if time_only:
            return _Chunk(np.empty(0, np.int64), ts, np.empty((n, 0)))
        if const_stream is None:
            codes = _stream_codes(rb.column(s.stream_col), self._names)
            if codes is None:
                raise self._blank_ids(f)
        else:
            codes = np.full(n, self._names.codes([const_stream])[0], np.int64)
        values = np.empty((n, len(self.features)), np.float64)
        names = rb.schema.names
        for j, c in enumerate(self.features):
            if c in names:
                values[:, j] = _feature_arr(rb.column(c), f.path, c)
            else:
                values[:, j] = _partition_number(f, c)
        # -0.0 -> 0.0 so equal rows compare and sort identically whichever file they came from.
        values += 0.0
        return _Chunk(codes, ts, values)

    def _blank_ids(self, f: _File) -> DataError | None:
        """The error naming every row of ``f`` without a stream id (read again, unfiltered);
        None when every row has one."""
        col = self.schema.stream_col
        dataset = _dataset(f.path, f.fmt, {col: pa.string()} if f.fmt == "csv" else None, [col])
        return blank_id_error(f.path, col, (rb.column(col) for rb in dataset.to_batches(columns=[col])),
                              csv=f.fmt == "csv")

    def _time_sorted(self, f: _File) -> bool:
        last = None
        for chunk in self._read_file(f, 1 << 20, time_only=True):
            t = chunk.ts
            if len(t) == 0:
                continue
            if (last is not None and t[0] < last) or np.any(t[1:] < t[:-1]):
                return False
            last = t[-1]
        return True


def _partition_number(f: _File, col: str) -> float:
    raw = f.keys[col]
    try:
        return float(raw)
    except ValueError:
        raise DataError(f"{f.path}: partition key {col}={raw!r} is not a number") from None


# --------------------------------------------------------------------------- global order


def _sort_order(chunk: _Chunk, names: _Names, stream_first: bool) -> np.ndarray:
    """Row order by (ts, stream, values...) or (stream, ts, values...); NaN sorts last."""
    rank, n_rank = names.ranks(chunk.codes)
    ts, d = chunk.ts, chunk.values.shape[1]
    value_keys = [chunk.values[:, j] for j in range(d - 1, -1, -1)]  # lexsort: last key first
    t_min = int(ts.min())
    span = int(ts.max()) - t_min + 1
    if span * n_rank >= 1 << 62:
        primary = (ts, rank) if stream_first else (rank, ts)
        return np.lexsort((*value_keys, *primary))
    # (stream, ts) packed into one int64: a stable argsort, fast on nearly sorted input.
    rel = ts - t_min
    key = rank * span + rel if stream_first else rel * n_rank + rank
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    tie = sorted_key[1:] == sorted_key[:-1]
    if d and tie.any():
        # Rows sharing (stream, ts) are ordered by their values; only those rows are re-sorted.
        in_tie = np.zeros(len(ts), bool)
        in_tie[1:] |= tie
        in_tie[:-1] |= tie
        pos = np.flatnonzero(in_tie)
        sub = order[pos]
        order[pos] = sub[np.lexsort((*[k[sub] for k in value_keys], key[sub]))]
    return order


def _same_as_previous(chunk: _Chunk, values: bool = True) -> np.ndarray:
    """Row i equals row i-1 in stream, ts (and values, NaN equal to NaN); row 0 is False."""
    n = len(chunk)
    same = np.zeros(n, bool)
    if n < 2:
        return same
    eq = chunk.ts[1:] == chunk.ts[:-1]
    eq &= chunk.codes[1:] == chunk.codes[:-1]
    if values:
        a, b = chunk.values[1:], chunk.values[:-1]
        eq &= np.all((a == b) | (np.isnan(a) & np.isnan(b)), axis=1)
    same[1:] = eq
    return same


def _sort_dedup(chunk: _Chunk, names: _Names, stream_first: bool) -> tuple[_Chunk, int]:
    """Sort by the full key and drop exact duplicates; returns (chunk, duplicates dropped)."""
    if len(chunk) == 0:
        return chunk, 0
    chunk = chunk.take(_sort_order(chunk, names, stream_first))
    dup = _same_as_previous(chunk)
    n_dup = int(dup.sum())
    if n_dup:
        chunk = chunk.take(np.flatnonzero(~dup))
    return chunk, n_dup


def _merge_conflicts(chunk: _Chunk) -> tuple[_Chunk, int]:
    """Rows sharing stream and timestamp (adjacent: ``chunk`` is sorted and de-duplicated)
    become one row holding their mean over finite values (NaN where a feature has none);
    returns (chunk, rows merged away). Train and replay share this rule."""
    same = _same_as_previous(chunk, values=False)
    n_merged = int(same.sum())
    if not n_merged:
        return chunk, 0
    start = np.flatnonzero(~same)
    size = np.diff(np.append(start, len(chunk)))
    finite = np.isfinite(chunk.values)
    sums = np.add.reduceat(np.where(finite, chunk.values, 0.0), start, axis=0)
    n = np.add.reduceat(finite.astype(np.int64), start, axis=0)
    values = chunk.values[start]  # single rows keep their values as read (inf included)
    multi = size > 1
    with np.errstate(invalid="ignore", divide="ignore"):
        values[multi] = np.where(n[multi] > 0, sums[multi] / np.maximum(n[multi], 1), np.nan)
    return _Chunk(chunk.codes[start], chunk.ts[start], values), n_merged


class _Run:
    """One time-sorted input to the k-way merge: a file read lazily, or a sorted chunk."""

    def __init__(self, chunks: Iterator[_Chunk], d: int):
        self._chunks = chunks
        self.pending: _Chunk = _Chunk.concat([], d)
        self.done = False
        self.d = d

    @property
    def last_ts(self) -> int:
        return int(self.pending.ts[-1])

    def read(self) -> None:
        """Append the next non-empty chunk to ``pending``, or mark the run done."""
        for chunk in self._chunks:
            if len(chunk):
                self.pending = _Chunk.concat([self.pending, chunk], self.d)
                return
        self.done = True

    def take_before(self, horizon: int | None) -> _Chunk:
        """Remove and return pending rows with ts < horizon (all rows when None)."""
        n = len(self.pending) if horizon is None else int(np.searchsorted(self.pending.ts, horizon, "left"))
        out, self.pending = self.pending.take(slice(0, n)), self.pending.take(slice(n, None))
        return out


class EventIterator:
    """Iterator of :class:`EventBatch` in global time order (see :func:`iter_events`).

    ``stats`` is filled while iterating: ``rows_read``, ``duplicates_dropped``, ``conflicts_merged``,
    ``events`` (rows yielded), ``files``, ``unsorted_files`` (files sorted in memory),
    ``max_buffered_rows`` (the most input rows held by the merge at once).
    """

    def __init__(self, source: Source, batch_rows: int):
        if batch_rows < 1:
            raise DataError(f"batch_rows must be at least 1, not {batch_rows}")
        self.source = source
        self.batch_rows = batch_rows
        self.stats: dict[str, Any] = {"rows_read": 0, "duplicates_dropped": 0, "conflicts_merged": 0,
                                      "events": 0, "files": len(source._files), "unsorted_files": [],
                                      "max_buffered_rows": 0}
        self._gen = self._generate()

    def __iter__(self) -> "EventIterator":
        return self

    def __next__(self) -> EventBatch:
        return next(self._gen)

    def _runs(self) -> list[_Run]:
        src, d = self.source, len(self.source.features)
        runs = []
        for f in src._files:
            if src._time_sorted(f):
                runs.append(_Run(src._read_file(f, self.batch_rows), d))
            else:
                # A file out of time order is read whole and sorted in memory.
                self.stats["unsorted_files"].append(str(f.path))
                whole = _Chunk.concat(list(src._read_file(f, self.batch_rows)), d)
                whole = whole.take(np.argsort(whole.ts, kind="stable"))
                runs.append(_Run(iter([whole]), d))
        return runs

    def _merged(self) -> Iterator[_Chunk]:
        """Sorted, de-duplicated chunks; all rows of one timestamp land in the same chunk."""
        runs = self._runs()
        for r in runs:
            r.read()
        d = len(self.source.features)
        while True:
            active = [r for r in runs if not r.done]
            # Every future row of an active run has ts >= its last pending ts, so rows below
            # the smallest such ts are final and can leave in global order.
            horizon = min((r.last_ts for r in active), default=None)
            parts = [r.take_before(horizon) for r in runs if len(r.pending)]
            ready = _Chunk.concat([p for p in parts if len(p)], d)
            if len(ready):
                self.stats["rows_read"] += len(ready)
                out, n_dup = _sort_dedup(ready, self.source._names, stream_first=False)
                out, n_conf = _merge_conflicts(out)
                self.stats["duplicates_dropped"] += n_dup
                self.stats["conflicts_merged"] += n_conf
                yield out
            if not active:
                return
            min(active, key=lambda r: r.last_ts).read()
            buffered = sum(len(r.pending) for r in runs)
            self.stats["max_buffered_rows"] = max(self.stats["max_buffered_rows"], buffered)

    def _generate(self) -> Iterator[EventBatch]:
        # Output batches are cut at exactly batch_rows so they too do not depend on the input split.
        d, n = len(self.source.features), self.batch_rows
        buf: list[_Chunk] = []
        size = 0
        for chunk in self._merged():
            buf.append(chunk)
            size += len(chunk)
            if size >= n:
                whole = _Chunk.concat(buf, d)
                cut = (size // n) * n
                for start in range(0, cut, n):
                    yield self._emit(whole.take(slice(start, start + n)))
                rest = whole.take(slice(cut, None))
                buf, size = ([rest] if len(rest) else []), len(rest)
        if size:
            yield self._emit(_Chunk.concat(buf, d))

    def _emit(self, chunk: _Chunk) -> EventBatch:
        self.stats["events"] += len(chunk)
        return self.source._to_batch(chunk)


def iter_events(source: Source, batch_rows: int = 65536) -> EventIterator:
    """Every event of ``source`` in global time order, for replay.

    Order: by (ts, stream), so the output, including where batches are cut, never depends on
    how the input was split into files or batches. As in :func:`load_history`, exact
    duplicate rows (same stream, ts and values) are dropped (``stats["duplicates_dropped"]``)
    and rows of one stream sharing a timestamp with different values are merged into one
    event, their mean over finite values (``stats["conflicts_merged"]``): every (stream, ts)
    is one event.

    Memory: time-sorted files are merged k-way while streaming (bounded by about one batch
    per file plus the rows sharing one timestamp). Each file is first scanned once on its time
    column to check it is sorted; a file that is not is read whole and sorted in memory.
    """
    return EventIterator(source, batch_rows)


#: What reading did to rows and values, as the stats of load_history and iter_events count it.
DATA_NOTES = (("duplicates_dropped", "exact duplicate rows dropped"),
              ("conflicts_merged", "rows merged into another of their stream and timestamp (mean kept)"),
              ("nonfinite_values", "infinite values read as missing"),
              ("missing_filled", "missing values filled"),
              ("rows_dropped_missing", "rows dropped for missing values"),
              ("gaps_split", "gaps split a stream"))


def data_notes(stats: dict[str, Any]) -> str | None:
    """One line on rows the data preparation dropped, merged or filled (None: nothing)."""
    done = [f"{stats[k]:,} {what}" for k, what in DATA_NOTES if stats.get(k)]
    return f"data: {stats['rows_read']:,} rows read; " + "; ".join(done) if done else None


# --------------------------------------------------------------------------- history


@dataclass
class History:
    """Prepared per-stream sequences.

    A stream split at gaps longer than ``max_gap_ms`` appears once per segment, with the same
    id, in time order; everything keyed by stream (split, per-stream scalers) groups segments.
    """

    streams: list[str]
    ts: list[np.ndarray]  # per segment int64, sorted, unique
    values: list[np.ndarray]  # per segment (T_s, D) float64
    features: list[str]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.streams)

    @property
    def n_rows(self) -> int:
        return int(sum(len(t) for t in self.ts))

    def segments_of(self, stream_id: str) -> list[int]:
        return [i for i, s in enumerate(self.streams) if s == stream_id]


def _read_all(source: Source, streams: Iterable[str] | None = None) -> _Chunk:
    """Every row, or only the rows of ``streams`` (filtered batch by batch, so memory holds
    just those streams)."""
    d = len(source.features)
    if streams is None:
        return _Chunk.concat(list(source._iter_chunks(1 << 20)), d)
    only = sorted(set(map(str, streams)))
    wanted = source._names.codes(only)
    parts = []
    for chunk in source._iter_chunks(1 << 20, only=only):
        keep = np.isin(chunk.codes, wanted)
        if keep.any():
            parts.append(chunk.take(np.flatnonzero(keep)) if not keep.all() else chunk)
    return _Chunk.concat(parts, d)


def _ffill(values: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Forward fill NaN per column; returns (values, cells filled, leading rows to drop)."""
    missing = np.isnan(values)
    if not missing.any():
        return values, 0, 0
    t = values.shape[0]
    idx = np.where(~missing, np.arange(t)[:, None], -1)
    np.maximum.accumulate(idx, axis=0, out=idx)
    # Leading rows where some feature has not been seen yet cannot be filled.
    lead = int(np.max(np.argmax(idx >= 0, axis=0) + np.where((idx >= 0).any(axis=0), 0, t)))
    lead = min(lead, t)
    cols = np.arange(values.shape[1])[None, :]
    filled = values[np.maximum(idx, 0), cols]
    filled[idx < 0] = np.nan
    n_filled = int(missing[lead:].sum())
    return filled[lead:], n_filled, lead


def _apply_missing(ts: np.ndarray, values: np.ndarray, policy: str, stats: dict) -> tuple[np.ndarray, np.ndarray]:
    if policy == "ffill":
        values, n_filled, lead = _ffill(values)
        stats["missing_filled"] += n_filled
        stats["rows_dropped_missing"] += lead
        return ts[lead:], values
    missing = np.isnan(values)
    if policy == "drop":
        keep = ~missing.any(axis=1)
        stats["rows_dropped_missing"] += int((~keep).sum())
        return ts[keep], values[keep]
    stats["missing_filled"] += int(missing.sum())
    return ts, np.where(missing, 0.0, values)


def _split_gaps(ts: np.ndarray, max_gap_ms: int | None) -> list[slice]:
    if max_gap_ms is None or len(ts) < 2:
        return [slice(0, len(ts))]
    cuts = np.flatnonzero(np.diff(ts) > max_gap_ms) + 1
    bounds = [0, *cuts.tolist(), len(ts)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _with_dt(ts: np.ndarray, values: np.ndarray) -> np.ndarray:
    dt = np.zeros(len(ts))
    dt[1:] = np.diff(ts) / 1000.0
    return np.column_stack([values, dt])


def load_history(source: Source, *, missing: str = "ffill", max_gap_ms: int | None = None,
                 time_delta_feature: bool = False, streams: Iterable[str] | None = None) -> History:
    """Read the whole source into per-stream sequences ready for training.

    Steps, per stream: sort by time; drop exact duplicate rows; rows sharing a timestamp with
    different values are merged into their NaN-aware mean (counted as ``conflicts_merged``);
    non-finite values (inf) count as missing. Missing values follow ``missing``:

    - ``"ffill"``: carry the stream's last observed value forward (also across gaps); leading
      rows before every feature has been observed once are dropped (so a stream that never
      reports some feature is dropped whole, counted in ``rows_dropped_missing``);
    - ``"drop"``: drop every row with a missing value;
    - ``"zero"``: replace missing values by 0 (in raw units).

    A feature that is missing everywhere raises :class:`DataError`. Gaps longer than
    ``max_gap_ms`` split a stream into segments that are trained as separate sequences (no
    window spans a gap). ``time_delta_feature`` appends feature ``"dt"``: seconds since the
    stream's previous kept event (0 for a segment's first event).

    ``streams`` restricts the load to those stream ids (memory then holds only their rows;
    see :func:`iter_history`); each stream is prepared exactly as in a full load, and rows
    of other streams without a stream id are refused as a full load refuses them.
    """
    if streams is not None:
        _check_stream_ids(source)
    return _prepare(source, missing, max_gap_ms, time_delta_feature, streams, check_features=True)


def _prepare(source: Source, missing: str, max_gap_ms: int | None, time_delta_feature: bool,
             streams: Iterable[str] | None, check_features: bool) -> History:
    if missing not in _MISSING_POLICIES:
        raise DataError(f"missing-value policy must be one of {', '.join(_MISSING_POLICIES)}, not {missing!r}")
    if max_gap_ms is not None and max_gap_ms <= 0:
        raise DataError(f"max_gap_ms must be positive, not {max_gap_ms}")
    features = list(source.features)
    if time_delta_feature and "dt" in features:
        raise DataError("a column named 'dt' is already a feature; the time-delta feature needs that name")
    data = _read_all(source, streams)
    stats: dict[str, Any] = {
        "paths": [str(p) for p in source.paths], "files": len(source._files), "rows_read": len(data),
        "duplicates_dropped": 0, "conflicts_merged": 0, "nonfinite_values": 0, "missing_filled": 0,
        "rows_dropped_missing": 0, "gaps_split": 0, "missing_policy": missing, "max_gap_ms": max_gap_ms,
        "time_delta_feature": time_delta_feature,
    }
    inf = np.isinf(data.values)
    stats["nonfinite_values"] = int(inf.sum())
    if inf.any():
        data.values[inf] = np.nan
    if check_features:
        _check_features_seen(np.isnan(data.values).all(axis=0), source)
    data, stats["duplicates_dropped"] = _sort_dedup(data, source._names, stream_first=True)
    data, stats["conflicts_merged"] = _merge_conflicts(data)
    seg_ids, ts_list, val_list = _build_segments(data, source._names, missing, max_gap_ms,
                                                 time_delta_feature, stats)
    if time_delta_feature:
        features.append("dt")
    all_ts = [t for t in ts_list if len(t)]
    stats.update(streams=len(set(seg_ids)), segments=len(seg_ids), rows=int(sum(len(t) for t in ts_list)),
                 time_min=int(min(t[0] for t in all_ts)) if all_ts else None,
                 time_max=int(max(t[-1] for t in all_ts)) if all_ts else None)
    if not seg_ids and streams is None:
        raise DataError(f"no rows left after the {missing!r} missing-value policy in "
                        f"{', '.join(map(str, source.paths))}")
    return History(seg_ids, ts_list, val_list, features, stats)


def _check_stream_ids(source: Source) -> None:
    """Raise for rows without a stream id in any file: a read filtered to some streams
    passes over them (iter_history's counting pass finds them instead)."""
    for f in source._files:
        if source._const_stream(f) is None:
            error = source._blank_ids(f)
            if error is not None:
                raise error


def _check_features_seen(all_nan: np.ndarray, source: Source) -> None:
    if all_nan.any():
        name = source.features[int(np.argmax(all_nan))]
        raise DataError(f"feature {name!r} has no value in {', '.join(map(str, source.paths))}")


def _count_pass(source: Source) -> tuple[dict[str, int], np.ndarray]:
    """One pass: input rows per stream id, and which features have any finite value."""
    counts = np.zeros(0, np.int64)
    seen = np.zeros(len(source.features), bool)
    for chunk in source._iter_chunks(1 << 20):
        n = np.bincount(chunk.codes, minlength=len(source._names))
        counts = np.concatenate([counts, np.zeros(len(n) - len(counts), np.int64)]) + n
        seen |= np.isfinite(chunk.values).any(axis=0)
    present = np.flatnonzero(counts)
    names = source._names.lookup(present)
    return {str(s): int(counts[c]) for s, c in zip(names, present)}, seen


def stream_counts(source: Source) -> dict[str, int]:
    """Input rows per stream id (before de-duplication), from one pass over the files."""
    return _count_pass(source)[0]


def iter_history(source: Source, max_rows: int, *, missing: str = "ffill", max_gap_ms: int | None = None,
                 time_delta_feature: bool = False) -> Iterator[History]:
    """The history of :func:`load_history` in parts of whole streams, for bounded memory.

    Streams (in id order) are grouped so that each part holds at most ``max_rows`` input
    rows (a single larger stream is a part of its own); each part is one pass over the
    files keeping only its streams' rows. Every stream is prepared exactly as by
    :func:`load_history`, and the parts together hold the same sequences. One counting pass
    comes first and also raises :class:`DataError` for a feature with no value anywhere.
    """
    if max_rows < 1:
        raise DataError(f"max_rows must be at least 1, not {max_rows}")
    counts, seen = _count_pass(source)
    _check_features_seen(~seen, source)
    group: list[str] = []
    size = 0
    for sid in sorted(counts):
        if group and size + counts[sid] > max_rows:
            yield _prepare(source, missing, max_gap_ms, time_delta_feature, group, check_features=False)
            group, size = [], 0
        group.append(sid)
        size += counts[sid]
    if group:
        yield _prepare(source, missing, max_gap_ms, time_delta_feature, group, check_features=False)


def _build_segments(data: _Chunk, names: _Names, missing: str, max_gap_ms: int | None, dt: bool,
                    stats: dict) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    n = len(data)
    new_stream = np.ones(n, bool)
    new_stream[1:] = data.codes[1:] != data.codes[:-1]
    starts = np.flatnonzero(new_stream).tolist() + [n]
    ids = names.lookup(data.codes[starts[:-1]])
    streams, ts_list, val_list = [], [], []
    for sid, a, b in zip(ids, starts[:-1], starts[1:]):
        ts, values = _apply_missing(data.ts[a:b], data.values[a:b], missing, stats)
        if len(ts) == 0:
            continue
        segs = _split_gaps(ts, max_gap_ms)
        stats["gaps_split"] += len(segs) - 1
        for seg in segs:
            t, v = ts[seg].copy(), np.ascontiguousarray(values[seg])
            streams.append(sid)
            ts_list.append(t)
            val_list.append(_with_dt(t, v) if dt else v)
    return streams, ts_list, val_list


# --------------------------------------------------------------------------- split


@dataclass
class Split:
    """Time-ordered parts of a History; ``cutoffs`` = {"valid": {stream: ts}, "calib": {stream: ts}}.

    For each stream, train holds ts < cutoffs["valid"][s], valid holds
    cutoffs["valid"][s] <= ts < cutoffs["calib"][s], calib holds ts >= cutoffs["calib"][s].
    """

    train: History
    valid: History
    calib: History
    cutoffs: dict


def split_by_time(history: History, valid: float = 0.15, calib: float = 0.15) -> Split:
    """Split every stream by time: the oldest rows train, the next validate, the newest calibrate.

    Each stream's rows (over all its segments) are counted; the newest ``round(n * calib)``
    calibrate, the ``round(n * valid)`` before them validate, the rest train. Parts are cut
    by timestamp, so nothing after a cut changes what lies before it (only the row count
    decides where the cut falls). Segments that end up empty in a part are left out of it.
    """
    for name, frac in (("valid", valid), ("calib", calib)):
        if not 0.0 <= frac < 1.0:
            raise DataError(f"{name} fraction must be in [0, 1), not {frac}")
    if valid + calib >= 1.0:
        raise DataError(f"valid + calib fractions ({valid} + {calib}) leave nothing to train on")
    by_stream: dict[str, list[int]] = {}
    for i, s in enumerate(history.streams):
        by_stream.setdefault(s, []).append(i)
    cut_valid: dict[str, int] = {}
    cut_calib: dict[str, int] = {}
    for s, segs in by_stream.items():
        ts = np.concatenate([history.ts[i] for i in segs])
        n = len(ts)
        n_calib, n_valid = int(round(n * calib)), int(round(n * valid))
        n_train = max(n - n_calib - n_valid, 0)
        end = int(ts[-1]) + 1
        cut_valid[s] = int(ts[n_train]) if n_train < n else end
        cut_calib[s] = int(ts[n_train + n_valid]) if n_train + n_valid < n else end
    parts = {"train": ([], [], []), "valid": ([], [], []), "calib": ([], [], [])}
    for s, t, v in zip(history.streams, history.ts, history.values):
        a = int(np.searchsorted(t, cut_valid[s], "left"))
        b = int(np.searchsorted(t, cut_calib[s], "left"))
        for name, sl in (("train", slice(0, a)), ("valid", slice(a, b)), ("calib", slice(b, None))):
            if len(t[sl]):
                parts[name][0].append(s)
                parts[name][1].append(t[sl])
                parts[name][2].append(v[sl])

    def make(name: str) -> History:
        streams, ts_list, vals = parts[name]
        st = {"part": name, "rows": int(sum(len(t) for t in ts_list)), "streams": len(set(streams)),
              "segments": len(streams), "source": history.stats}
        return History(streams, ts_list, vals, list(history.features), st)

    return Split(make("train"), make("valid"), make("calib"), {"valid": cut_valid, "calib": cut_calib})


# --------------------------------------------------------------------------- scaler


def _centre_scale(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per column, NaN ignored; a zero or undefined scale becomes 1."""
    d = x.shape[1]
    if x.shape[0] == 0:
        return np.zeros(d), np.ones(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: handled below
        if kind == "zscore":
            centre, scale = np.nanmean(x, axis=0), np.nanstd(x, axis=0)
        else:
            q1, med, q3 = np.nanpercentile(x, [25.0, 50.0, 75.0], axis=0)
            centre, scale = med, (q3 - q1) / 1.349
    centre = np.where(np.isfinite(centre), centre, 0.0)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    return centre.astype(np.float64), scale.astype(np.float64)


@dataclass
class Scaler:
    """Feature scaling fitted on the training part; ``transform`` maps raw units to model units.

    ``mean``/``scale`` (D,) are the global statistics, always filled; with ``per_stream`` the
    rows of ``stream_mean``/``stream_scale`` (S, D) belong to ``stream_ids`` and streams not
    in that list fall back to the global ones. For ``kind="robust"`` "mean" is the median and
    "scale" the interquartile range / 1.349 (equal to the standard deviation for a normal).
    """

    kind: str
    per_stream: bool
    mean: np.ndarray
    scale: np.ndarray
    stream_ids: list[str] | None = None
    stream_mean: np.ndarray | None = None
    stream_scale: np.ndarray | None = None

    def _rows(self, stream_id: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, scale) broadcastable against (n, D) values of ``stream_id`` (one id or n ids)."""
        if not self.per_stream or self.stream_ids is None:
            return self.mean, self.scale
        index = self._index
        if isinstance(stream_id, str):
            i = index.get(stream_id)
            return (self.mean, self.scale) if i is None else (self.stream_mean[i], self.stream_scale[i])
        ids = list(stream_id)
        if len(ids) != n:
            raise DataError(f"{len(ids)} stream ids for {n} rows")
        rows = np.array([index.get(s, -1) for s in ids], np.int64)
        hit = rows >= 0
        mean = np.broadcast_to(self.mean, (n, self.mean.shape[0])).copy()
        scale = np.broadcast_to(self.scale, (n, self.scale.shape[0])).copy()
        mean[hit], scale[hit] = self.stream_mean[rows[hit]], self.stream_scale[rows[hit]]
        return mean, scale

    @property
    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None or len(cached) != len(self.stream_ids):
            cached = {s: i for i, s in enumerate(self.stream_ids)}
            self.__dict__["_index_cache"] = cached
        return cached

    def transform(self, stream_id: Any, values: np.ndarray) -> np.ndarray:
        """Raw units -> scaled; ``stream_id`` is one id or one id per row."""
        v = np.asarray(values, np.float64)
        mean, scale = self._rows(stream_id, v.shape[0] if v.ndim == 2 else 1)
        return (v - mean) / scale

    def inverse_transform(self, stream_id: Any, values: np.ndarray) -> np.ndarray:
        """Scaled -> raw units; ``stream_id`` is one id or one id per row."""
        v = np.asarray(values, np.float64)
        mean, scale = self._rows(stream_id, v.shape[0] if v.ndim == 2 else 1)
        return v * scale + mean

    def apply(self, history: History) -> History:
        """A new History with every segment's values scaled (float64)."""
        vals = [self.transform(s, v) for s, v in zip(history.streams, history.values)]
        return History(list(history.streams), list(history.ts), vals, list(history.features),
                       {**history.stats, "scaled": self.kind})

    def model_fields(self) -> dict[str, Any]:
        """Keyword arguments for :class:`streamrnn.model.Model`: scaler_mean, scaler_scale, stream_scaler."""
        stream = None
        if self.per_stream and self.stream_ids:
            stream = {"streams": list(self.stream_ids), "mean": self.stream_mean.copy(),
                      "scale": self.stream_scale.copy()}
        return {"scaler_mean": self.mean.copy(), "scaler_scale": self.scale.copy(), "stream_scaler": stream}


#: Rows kept to estimate the global robust scaler when the training part arrives in parts.
ROBUST_SAMPLE_ROWS = 1_000_000


def fit_scaler(train: History | Iterable[History], kind: str = "zscore", per_stream: bool = False) -> Scaler:
    """Fit a z-score (mean, std) or robust (median, IQR/1.349) scaler on the training part.

    NaN values are ignored; a zero or undefined scale becomes 1 (a constant feature is only
    centred). The global statistics are always fitted (the fallback for unseen streams).

    ``train`` may also be an iterable of parts (for example the training parts of
    :func:`iter_history`), consumed once, each stream wholly in one part. Then memory holds
    one part at a time: z-score and per-stream statistics stay exact; the global robust
    statistics come from a uniform sample of at most :data:`ROBUST_SAMPLE_ROWS` rows (exact
    below that).
    """
    if kind not in ("zscore", "robust"):
        raise DataError(f"scaler kind must be 'zscore' or 'robust', not {kind!r}")
    if not isinstance(train, History):
        return _fit_scaler_parts(train, kind, per_stream)
    d = len(train.features)
    rows = [v for v in train.values if len(v)]
    if not rows:
        raise DataError("the training part has no rows to fit the scaler on")
    mean, scale = _centre_scale(np.concatenate(rows), kind)
    if not per_stream:
        return Scaler(kind, False, mean, scale)
    ids = sorted(set(train.streams))
    s_mean, s_scale = np.empty((len(ids), d)), np.empty((len(ids), d))
    for i, s in enumerate(ids):
        x = np.concatenate([v for sid, v in zip(train.streams, train.values) if sid == s])
        s_mean[i], s_scale[i] = _centre_scale(x, kind)
    return Scaler(kind, True, mean, scale, ids, s_mean, s_scale)


def _per_stream_stats(part: History, kind: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for s in sorted(set(part.streams)):
        x = np.concatenate([v for sid, v in zip(part.streams, part.values) if sid == s])
        out[s] = _centre_scale(x, kind)
    return out


class _Moments:
    """Per-feature count, mean and sum of squared deviations, merged part by part (Chan et al.)."""

    def __init__(self, d: int):
        self.n, self.mean, self.m2 = np.zeros(d), np.zeros(d), np.zeros(d)

    def add(self, x: np.ndarray) -> None:
        ok = ~np.isnan(x)
        n_b = ok.sum(axis=0).astype(np.float64)
        mean_b = np.where(n_b > 0, np.where(ok, x, 0.0).sum(axis=0) / np.maximum(n_b, 1), 0.0)
        m2_b = np.where(ok, (x - mean_b) ** 2, 0.0).sum(axis=0)
        n = self.n + n_b
        delta = mean_b - self.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            self.mean = np.where(n > 0, self.mean + delta * n_b / np.maximum(n, 1), 0.0)
            self.m2 = self.m2 + m2_b + delta ** 2 * self.n * n_b / np.maximum(n, 1)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        scale = np.sqrt(self.m2 / np.maximum(self.n, 1))
        scale = np.where(np.isfinite(scale) & (scale > 0) & (self.n > 0), scale, 1.0)
        return self.mean.copy(), scale


def _fit_scaler_parts(parts: Iterable[History], kind: str, per_stream: bool) -> Scaler:
    moments: _Moments | None = None
    sample: WindowSampler | None = None
    streams: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for part in parts:
        rows = [v for v in part.values if len(v)]
        if not rows:
            continue
        x = np.concatenate(rows)
        if kind == "zscore":
            moments = moments or _Moments(x.shape[1])
            moments.add(x)
        else:
            # A reservoir of single rows (window 0) keeps the sample uniform over all parts.
            sample = sample or WindowSampler(window=0, stride=1, capacity=ROBUST_SAMPLE_ROWS, seed=0,
                                             dtype=np.float64)
            sample.add("rows", x)
        if per_stream:
            for s, stat in _per_stream_stats(part, kind).items():
                if s in streams:
                    raise DataError(f"stream {s!r} appears in more than one part of the training data")
                streams[s] = stat
    if moments is None and sample is None:
        raise DataError("the training part has no rows to fit the scaler on")
    mean, scale = moments.result() if moments is not None else _centre_scale(sample.windows()[:, 0, :], kind)
    if not per_stream:
        return Scaler(kind, False, mean, scale)
    ids = sorted(streams)
    return Scaler(kind, True, mean, scale, ids, np.array([streams[s][0] for s in ids]),
                  np.array([streams[s][1] for s in ids]))


# --------------------------------------------------------------------------- windows


class WindowSampler:
    """Reservoir sample of training windows drawn while streaming through the data.

    A window is ``window + 1`` consecutive rows: inputs ``x[t .. t+window-1]`` and targets
    ``x[t+1 .. t+window]``; windows start every ``stride`` rows from each sequence's first
    row. At most ``capacity`` windows are kept, each candidate with equal probability
    (Vitter's algorithm R), so memory stays at ``capacity * (window + 1) * D`` float32 however
    long the history. The sample depends only on the seed and the order of ``add`` calls.
    ``window=0`` samples single rows.
    """

    def __init__(self, window: int, stride: int, capacity: int, seed: int, *, dtype: Any = np.float32):
        if window < 0 or stride < 1 or capacity < 1:
            raise DataError(f"window ({window}), stride ({stride}) and capacity ({capacity}) must be at least 1")
        self.window, self.stride, self.capacity, self.seed = int(window), int(stride), int(capacity), seed
        self.dtype = np.dtype(dtype)
        self._rng = np.random.default_rng(seed)
        self._buf: np.ndarray | None = None
        self.n_seen = 0  # candidate windows offered so far
        self.short_sequences: list[str] = []  # ids of sequences shorter than one window
        self._tail: dict[str, tuple[np.ndarray, int, int]] = {}  # stream -> (rows, offset, next start)

    def add(self, stream_id: str, values_scaled: np.ndarray, *, continues: bool = False) -> int:
        """Offer every window of one sequence; returns how many windows were offered.

        With ``continues=True`` the rows continue the previous ``add`` of this stream (history
        fed in chunks), and windows may span the two calls.
        """
        x = np.asarray(values_scaled, self.dtype)
        if x.ndim != 2:
            raise DataError(f"values for stream {stream_id!r} must be (T, D), got shape {x.shape}")
        if self._buf is not None and x.shape[1] != self._buf.shape[2]:
            raise DataError(f"stream {stream_id!r} has {x.shape[1]} features, earlier ones {self._buf.shape[2]}")
        offset, start = 0, 0
        if continues and stream_id in self._tail:
            tail, offset, start = self._tail[stream_id]
            x = np.concatenate([tail, x])
        w = self.window + 1
        total = offset + len(x)
        starts = np.arange(start, total - w + 1, self.stride, dtype=np.int64)
        next_start = int(starts[-1]) + self.stride if len(starts) else start
        keep_from = min(max(next_start - offset, 0), len(x))
        self._tail[stream_id] = (x[keep_from:].copy(), offset + keep_from, next_start)
        if not len(starts):
            if not continues:
                self.short_sequences.append(str(stream_id))
            return 0
        self._offer(x, starts - offset)
        return len(starts)

    def _offer(self, x: np.ndarray, local_starts: np.ndarray) -> None:
        w, d, m = self.window + 1, x.shape[1], len(local_starts)
        if self._buf is None:
            self._buf = np.empty((self.capacity, w, d), self.dtype)
        idx = local_starts[:, None] + np.arange(w)[None, :]
        seen = self.n_seen + np.arange(m, dtype=np.int64)
        fill = seen < self.capacity
        self._buf[seen[fill]] = x[idx[fill]]
        rest = np.flatnonzero(~fill)
        if len(rest):
            # Algorithm R: candidate k replaces a uniform slot with probability capacity / (k + 1).
            j = self._rng.integers(0, seen[rest] + 1)
            take = j < self.capacity
            slots, cand = j[take], rest[take]
            # Several candidates of this call may hit one slot: the last one wins, as in sequence.
            last = len(slots) - 1 - np.unique(slots[::-1], return_index=True)[1]
            self._buf[slots[last]] = x[idx[cand[last]]]
        self.n_seen += m

    def __len__(self) -> int:
        return min(self.n_seen, self.capacity)

    def windows(self) -> np.ndarray:
        """The sampled windows, (N, window + 1, D) float32 (or ``dtype``), N = min(capacity, offered).

        A view of the reservoir, not a copy (memory stays at the capacity): later ``add``
        calls change it. It stays writable so Numba kernels see one array type.
        """
        if self._buf is None:
            return np.empty((0, self.window + 1, 0), self.dtype)
        return self._buf[: len(self)]
