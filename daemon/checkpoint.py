"""State stores: where a partition's detector state goes at a checkpoint and comes back from.

- :class:`LocalStore` (the default): one snapshot file per input partition in ``state_dir``,
  written atomically (temporary file, fsync, rename, fsync of the directory), so a crash
  leaves either the old or the new snapshot, never a torn one.
- :class:`ChangelogStore` (the Kafka Streams way): every stream's row is a record keyed by
  stream id in a changelog topic with one partition per input partition; a checkpoint sends
  the rows of the streams changed since the last one (and tombstones for streams that left
  the table). Any consumer of the group can rebuild a partition's state by reading its
  changelog partition to the end, so partitions move between machines.

A row is the stream's values of every table column packed into fixed-size bytes. Its
headers carry the layout's hash and the layout itself (column names, dtypes and shapes), so a
newer version restores rows written before it added columns (they take the columns' upgrade
values, as local snapshots do); rows of another model architecture are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from streamrnn.detector import ADDED_COLUMNS, Detector
from streamrnn.errors import StreamrnnError
from streamrnn.state import StreamTable

__all__ = ["LocalStore", "ChangelogStore", "RowCodec", "changelog_partition"]

log = logging.getLogger("daemon.checkpoint")
LAYOUT_HEADER = "streamrnn.layout"
#: JSON ``[[name, dtype, shape], ...]`` of the row's columns in packing order.
LAYOUT_SPEC_HEADER = "streamrnn.layout_spec"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class LocalStore:
    """Per-partition snapshot files in ``state_dir``."""

    kind = "local"

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StreamrnnError(f"cannot create state_dir {str(self.dir)!r}: {exc}") from None

    def path(self, topic: str, partition: int) -> Path:
        return self.dir / f"{topic}-{partition}.state.arrow"

    def save(self, topic: str, partition: int, detector: Detector, touched: set[str]) -> None:
        self.write(self.prepare(topic, partition, detector, touched))

    def prepare(self, topic: str, partition: int, detector: Detector, touched: set[str]):
        """The partition's state as of now, frozen: a copy of its table (memory copies only;
        encoding the snapshot on the scoring thread stalled every event behind it for
        26-46 ms at p99). :meth:`write` encodes and writes it later, in another thread,
        while the detector goes on."""
        return self.path(topic, partition), detector.table.copy()

    def write(self, prepared) -> None:
        """Persist what :meth:`prepare` returned (blocking: encoding and fsync; thread-safe:
        the copy is the writer's alone)."""
        path, table = prepared
        atomic_write(path, table.snapshot())

    def load(self, topic: str, partition: int, new_detector: Callable[..., Detector]) -> Detector:
        """The partition's detector from its snapshot, or a fresh one when there is none or
        it does not fit the model (logged)."""
        p = self.path(topic, partition)
        if not p.exists():
            return new_detector()
        try:
            return new_detector(snapshot=p.read_bytes())
        except StreamrnnError as exc:
            log.warning("snapshot not usable, starting the partition cold",
                        extra={"fields": {"path": str(p), "reason": str(exc)}})
            return new_detector()


class RowCodec:
    """Packs one stream's row of every column of a table into bytes, and back."""

    def __init__(self, table: StreamTable) -> None:
        self.columns = table.columns
        self.dtype = np.dtype([(name, spec.dtype, spec.shape) for name, spec in self.columns.items()])
        spec = json.dumps({n: [str(s.dtype), list(s.shape)] for n, s in self.columns.items()}, sort_keys=True)
        self.layout = hashlib.sha256(spec.encode()).hexdigest()[:16].encode()
        self.spec = json.dumps([[n, self.dtype[n].base.str, list(s.shape)] for n, s in self.columns.items()],
                               separators=(",", ":")).encode()

    def upgrade(self, spec: bytes, rows: list[bytes], added: dict | None = None) -> list[bytes] | None:
        """Rows packed in the layout ``spec`` (another codec's :attr:`spec`) repacked in this
        one: shared columns copied, columns the old layout lacks set to their value in
        ``added`` (default :data:`streamrnn.detector.ADDED_COLUMNS`). None when that is not
        possible (a shared column changed dtype or shape, a new column has no upgrade value)."""
        added = ADDED_COLUMNS if added is None else added
        try:
            old = np.dtype([(n, np.dtype(d), tuple(shape)) for n, d, shape in json.loads(spec)])
        except (TypeError, ValueError):
            return None
        if any(len(r) != old.itemsize for r in rows):
            return None
        data = np.frombuffer(b"".join(rows), old)
        out = np.zeros(len(rows), self.dtype)
        for name in self.columns:
            if name in old.names and old[name] == self.dtype[name]:
                out[name] = data[name]
            elif name not in old.names and name in added:
                out[name] = added[name]
            else:
                return None
        blob, size = out.tobytes(), self.dtype.itemsize
        return [blob[i * size:(i + 1) * size] for i in range(len(rows))]

    def export(self, table: StreamTable, stream_ids: list[str]) -> tuple[list[str], list[bytes | None]]:
        """Rows of ``stream_ids``; None (a tombstone) for streams the table no longer holds."""
        if not stream_ids:
            return [], []
        slots = table.lookup(stream_ids)
        rows = np.zeros(len(stream_ids), self.dtype)
        held = slots >= 0
        for name in self.columns:
            rows[name][held] = table.column(name)[slots[held]]
        blob = rows.tobytes()
        size = self.dtype.itemsize
        return list(stream_ids), [blob[i * size:(i + 1) * size] if h else None
                                  for i, h in enumerate(held.tolist())]

    def import_rows(self, table: StreamTable, stream_ids: list[str], rows: list[bytes]) -> None:
        """Put rows into ``table`` (streams created or overwritten)."""
        if not stream_ids:
            return
        data = np.frombuffer(b"".join(rows), self.dtype)
        slots = table.assign(stream_ids, data["last_seen"]).slots
        for name in self.columns:
            if name != "touch":  # the LRU clock is this table's own
                table.column(name)[slots] = data[name]


def changelog_partition(inputs: list[tuple[str, int]], topic: str, partition: int) -> int:
    """Changelog partition of an input partition: input partitions numbered topic by topic
    in configuration order (one changelog partition each)."""
    try:
        return inputs.index((topic, partition))
    except ValueError:
        raise StreamrnnError(f"{topic}[{partition}] is not an input partition") from None


def _current_rows(codec: RowCodec, latest: dict[str, tuple]) -> tuple[dict[str, bytes], int, int]:
    """Rows in ``codec``'s layout from (layout, spec, row) per stream: rows of an older layout
    upgraded (a layout at a time); rows that cannot be, or carry no spec, dropped (the stream
    starts cold). Returns the rows, how many were upgraded and how many dropped."""
    current: dict[str, bytes] = {}
    older: dict[tuple, list[str]] = {}
    for key, (layout, spec, row) in latest.items():
        if layout == codec.layout:
            current[key] = row
        else:
            older.setdefault((layout, spec), []).append(key)
    upgraded = foreign = 0
    for (layout, spec), keys in older.items():
        new = codec.upgrade(spec, [latest[k][2] for k in keys]) if spec is not None else None
        if new is None:
            foreign += len(keys)
            log.warning("changelog rows of another layout cannot be upgraded; their streams start cold",
                        extra={"fields": {"layout": (layout or b"").decode(errors="replace"), "streams": len(keys)}})
            continue
        current.update(zip(keys, new))
        upgraded += len(keys)
    return {k: current[k] for k in latest if k in current}, upgraded, foreign  # in changelog order


class ChangelogStore:
    """Stream rows in a changelog topic, one partition per input partition.

    ``producer`` is the daemon's KafkaProducer (its flush at a checkpoint acknowledges the
    rows before offsets are committed); ``consumer_factory()`` returns a group-less
    KafkaConsumer used to read a changelog partition back; ``inputs`` lists every input
    (topic, partition) in a fixed order.
    """

    kind = "changelog"

    def __init__(self, topic: str, producer, consumer_factory: Callable, inputs: list[tuple[str, int]]) -> None:
        self.topic = topic
        self.producer = producer
        self.consumer_factory = consumer_factory
        self.inputs = inputs
        self._known: dict[tuple[str, int], set[str]] = {}
        self._evictions: dict[tuple[str, int], int] = {}

    def save(self, topic: str, partition: int, detector: Detector, touched: set[str]) -> None:
        self.write(self.prepare(topic, partition, detector, touched))

    def prepare(self, topic: str, partition: int, detector: Detector, touched: set[str]):
        """The rows of the streams touched (and tombstones of those evicted) since the last
        checkpoint, as of now; :meth:`write` sends them (later, from the loop's thread)."""
        key = (topic, partition)
        table = detector.table
        codec = RowCodec(table)
        known = self._known.setdefault(key, set())
        ids = set(touched)
        if table.evictions != self._evictions.get(key, 0):
            # Streams evicted since the last checkpoint: tombstone them in the changelog.
            ids |= known - set(table.ids())
            self._evictions[key] = table.evictions
        names, rows = codec.export(table, sorted(ids))
        part = changelog_partition(self.inputs, topic, partition)
        for sid, row in zip(names, rows):
            (known.add if row is not None else known.discard)(sid)
        return part, (codec.layout, codec.spec), names, rows

    def write(self, prepared, send: Callable | None = None) -> None:
        """Send prepared rows with ``send(topic, key, value, partition, headers)`` (default:
        the producer's ``send``); the caller waits for their acknowledgements."""
        part, (layout, spec), names, rows = prepared
        headers = [(LAYOUT_HEADER, layout), (LAYOUT_SPEC_HEADER, spec)]
        for sid, row in zip(names, rows):
            if send is None:
                self.producer.send(self.topic, key=sid.encode(), value=row, partition=part, headers=headers)
            else:
                send(self.topic, sid.encode(), row, part, headers)

    def load(self, topic: str, partition: int, new_detector: Callable[..., Detector]) -> Detector:
        """Rebuild the partition's detector from its changelog partition (last row per stream)."""
        from kafka import TopicPartition

        det = new_detector()
        codec = RowCodec(det.table)
        part = changelog_partition(self.inputs, topic, partition)
        tp = TopicPartition(self.topic, part)
        latest: dict[str, tuple | None] = {}  # the last record per stream: (layout, spec, row)
        t0 = time.perf_counter()
        consumer = self.consumer_factory()
        try:
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            end = consumer.end_offsets([tp])[tp]
            while consumer.position(tp) < end:
                for rec in consumer.poll(timeout_ms=200).get(tp, []):
                    if rec.value is None:
                        latest[rec.key.decode()] = None
                        continue
                    headers = dict(rec.headers or [])
                    latest[rec.key.decode()] = (headers.get(LAYOUT_HEADER), headers.get(LAYOUT_SPEC_HEADER), rec.value)
        finally:
            consumer.close()
        rows, upgraded, foreign = _current_rows(codec, {k: v for k, v in latest.items() if v is not None})
        codec.import_rows(det.table, list(rows), list(rows.values()))
        self._known[(topic, partition)] = set(rows)
        self._evictions[(topic, partition)] = det.table.evictions
        log.info("restored partition from changelog",
                 extra={"fields": {"topic": topic, "partition": partition, "streams": len(rows),
                                   "records": end, "upgraded_layout": upgraded, "foreign_layout": foreign,
                                   "seconds": round(time.perf_counter() - t0, 3)}})
        return det

    def forget(self, topic: str, partition: int) -> None:
        self._known.pop((topic, partition), None)
        self._evictions.pop((topic, partition), None)
