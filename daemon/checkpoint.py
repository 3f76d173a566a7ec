"""State stores: where a partition's detector state goes at a checkpoint and comes back from.

- :class:`LocalStore` (the default): per input partition in ``state_dir``, a snapshot file
  written atomically (temporary file, fsync, rename, fsync of the directory), so a crash
  leaves either the old or the new snapshot, never a torn one, and a log of checkpoint
  deltas after it (the rows that changed; each frame checksummed, fsynced), so that a
  checkpoint costs in proportion to the streams that changed, not to the streams held.
- :class:`ChangelogStore` (the Kafka Streams way): every stream's row is a record keyed by
  stream id in a changelog topic with one partition per input partition; a checkpoint sends
  the rows of the streams changed since the last one (and tombstones for streams that left
  the table). Any consumer of the group can rebuild a partition's state by reading its
  changelog partition to the end, so partitions move between machines.

A row is the stream's values of every table column packed into fixed-size bytes. Its header
carries the layout's hash; the layout itself (column names, dtypes and shapes) is a record of
its own keyed by that hash, sent with each checkpoint's rows. So a newer version restores rows
written before it added columns (they take the columns' upgrade values, as local snapshots
do); rows of another model architecture are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np

from daemon.errors import DaemonError
from streamrnn.detector import ADDED_COLUMNS, Detector
from streamrnn.errors import StreamrnnError
from streamrnn.state import StreamTable

__all__ = ["LocalStore", "ChangelogStore", "RowCodec", "changelog_partition", "confluent_records", "kafka_python_records"]

log = logging.getLogger("daemon.checkpoint")
LAYOUT_HEADER = "streamrnn.layout"
#: JSON ``[[name, dtype, shape], ...]`` of the row's columns in packing order (rows written
#: before spec records carry it as a header).
LAYOUT_SPEC_HEADER = "streamrnn.layout_spec"
#: Key prefix of a changelog record whose value is the spec of the layout hash that follows:
#: 0xff never occurs in utf-8, so no stream id is such a key (compaction keeps one per layout).
SPEC_KEY_PREFIX = b"\xff"


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


#: A delta checkpoint is written while the log stays under this fraction of the snapshot.
DELTA_FRACTION = 0.5
_FRAME = struct.Struct("<4sIQI")  # magic, header length, payload length, CRC32C of header + payload
_MAGIC = b"SRD1"


class LocalStore:
    """Per-partition state files in ``state_dir``: a snapshot and a log of deltas after it.

    A checkpoint writes a *delta* (the rows of the streams changed since the last checkpoint
    and tombstones of those evicted, appended to ``<partition>.state.log`` and fsynced) while
    the log stays under ``delta_fraction`` of the snapshot's size; otherwise a full snapshot
    (written atomically), after which the log starts again. A checkpoint therefore costs in
    proportion to the streams that changed, not to the streams held (at a million streams a
    full one copied and wrote ~355 MB). Every log frame names the snapshot it follows (its
    CRC32C) and carries its own CRC: restore applies the frames of the current snapshot in
    order up to the first bad one (a crash while appending; that checkpoint never committed)
    and ignores a log left over from an older snapshot (a crash between the snapshot and the
    log's restart). The first checkpoint after a restore is a full one.
    """

    kind = "local"

    def __init__(self, state_dir: str | Path, delta_fraction: float = DELTA_FRACTION) -> None:
        self.dir = Path(state_dir)
        self.delta_fraction = delta_fraction
        self._written: dict[tuple[str, int], _Written] = {}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StreamrnnError(f"cannot create state_dir {str(self.dir)!r}: {exc}") from None

    def path(self, topic: str, partition: int) -> Path:
        return self.dir / f"{topic}-{partition}.state.arrow"

    def log_path(self, topic: str, partition: int) -> Path:
        return self.dir / f"{topic}-{partition}.state.log"

    def save(self, topic: str, partition: int, detector: Detector, touched: set[str]) -> None:
        self.write(self.prepare(topic, partition, detector, touched))

    def prepare(self, topic: str, partition: int, detector: Detector, touched: set[str]):
        """The partition's state as of now, frozen (memory copies only: encoding on the
        scoring thread stalled every event behind it for 26-46 ms at p99); :meth:`write`
        encodes and writes it later, in another thread, while the detector goes on.
        ``touched``: every stream whose row changed or that left the table since the last
        checkpoint of this partition."""
        key = (topic, partition)
        table = detector.table
        done = self._written.get(key)
        if done is not None and done.table is table:
            codec = RowCodec(table)
            grows = len(touched) * codec.dtype.itemsize
            if codec.layout == done.layout and done.log_bytes + grows <= self.delta_fraction * done.base_bytes:
                # Only gathers here (a column at a time); packing and framing in write().
                ids = list(touched)
                slots = table.lookup(ids)
                held = slots >= 0
                values = dict(zip(codec.columns, (c[slots[held]] for c in table.column_arrays(codec.columns))))
                return _Delta(key, codec, ids, held, values, table.counters)
        return _Full(key, table, table.copy())

    def write(self, prepared) -> tuple[str, int]:
        """Persist what :meth:`prepare` returned (blocking: encoding and fsync; thread-safe:
        it owns its copies); returns the kind (``"full"`` or ``"delta"``) and the bytes
        written. A file system error (a full disk, lost permissions) is a
        :class:`~daemon.errors.DaemonError` naming the file: the daemon stops with it, and
        since nothing past the last saved checkpoint was committed, a restart replays it."""
        try:
            return self._write(prepared)
        except OSError as exc:
            self._written.pop(prepared.key, None)  # whatever is on disk now, start again with a full one
            raise DaemonError(f"cannot write the checkpoint of {prepared.key[0]}[{prepared.key[1]}] to "
                              f"{str(self.dir)!r}: {exc.strerror or exc}") from None

    def _write(self, prepared) -> tuple[str, int]:
        topic, partition = prepared.key
        if isinstance(prepared, _Full):
            data = prepared.copy.snapshot()
            atomic_write(self.path(topic, partition), data)
            base = crc32c.crc32c(data)
            start = _frame({"base": base, "seq": 0}, b"")
            atomic_write(self.log_path(topic, partition), start)
            self._written[prepared.key] = _Written(prepared.table, RowCodec(prepared.copy).layout, base,
                                                   len(data), len(start), 0)
            return "full", len(data) + len(start)
        done = self._written[prepared.key]
        codec = prepared.codec
        rows = np.zeros(int(prepared.held.sum()), codec.dtype)
        for name, col in prepared.values.items():
            rows[name] = col
        clock, watermark, evictions = prepared.counters
        header = {"base": done.base, "seq": done.seq + 1, "spec": codec.spec.decode(), "ids": prepared.ids,
                  "dead": np.flatnonzero(~prepared.held).tolist(), "clock": clock,
                  "watermark": watermark, "evictions": evictions}
        frame = _frame(header, rows.tobytes())
        try:
            with open(self.log_path(topic, partition), "ab") as f:
                f.write(frame)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            # Frames appended after a torn one would never be read back: the next is full.
            self._written.pop(prepared.key, None)
            raise
        done.log_bytes += len(frame)
        done.seq += 1
        return "delta", len(frame)

    def load(self, topic: str, partition: int, new_detector: Callable[..., Detector]) -> Detector:
        """The partition's detector from its snapshot and the deltas after it, or a fresh
        one when there is no snapshot or it does not fit the model (logged)."""
        self._written.pop((topic, partition), None)  # the first checkpoint after this is full
        p = self.path(topic, partition)
        if not p.exists():
            return new_detector()
        data = p.read_bytes()
        try:
            det = new_detector(snapshot=data)
        except StreamrnnError as exc:
            log.warning("snapshot not usable, starting the partition cold",
                        extra={"fields": {"path": str(p), "reason": str(exc)}})
            return new_detector()
        lp = self.log_path(topic, partition)
        if lp.exists():
            applied = _apply_log(det.table, lp.read_bytes(), crc32c.crc32c(data), str(lp))
            if applied:
                log.info("applied checkpoint deltas", extra={"fields": {"path": str(lp), "deltas": applied}})
        return det

    def forget(self, topic: str, partition: int) -> None:
        """The partition left this process: its next checkpoint here (if it comes back) is full."""
        self._written.pop((topic, partition), None)


@dataclass
class _Full:
    key: tuple[str, int]
    table: StreamTable  # the live table (to know whether the next checkpoint can be a delta)
    copy: StreamTable  # its state as of prepare


@dataclass
class _Delta:
    key: tuple[str, int]
    codec: "RowCodec"
    ids: list[str]  # streams changed since the last checkpoint
    held: np.ndarray  # (len(ids),) bool: still in the table (else a tombstone)
    values: dict  # column -> its rows of the held streams, in ids order
    counters: tuple


@dataclass
class _Written:
    """What is on disk for a partition this process checkpointed."""

    table: StreamTable
    layout: bytes
    base: int  # CRC32C of the snapshot
    base_bytes: int
    log_bytes: int
    seq: int


def _frame(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _FRAME.pack(_MAGIC, len(head), len(payload), crc32c.crc32c(payload, crc32c.crc32c(head))) + head + payload


def _frames(data: bytes):
    """(header, payload) of each intact frame, in order, up to the first that is not."""
    pos = 0
    while pos + _FRAME.size <= len(data):
        magic, n_head, n_pay, crc = _FRAME.unpack_from(data, pos)
        body = pos + _FRAME.size
        end = body + n_head + n_pay
        if magic != _MAGIC or end > len(data):
            return
        head, payload = data[body:body + n_head], data[body + n_head:end]
        if crc32c.crc32c(payload, crc32c.crc32c(head)) != crc:
            return
        yield json.loads(head), payload
        pos = end


def _apply_log(table: StreamTable, data: bytes, base: int, where: str) -> int:
    """Apply the deltas of ``data`` that follow the snapshot ``base`` to ``table``; returns
    how many. Rows of an older layout are upgraded as a snapshot's columns are."""
    codec = RowCodec(table)
    applied = expected = 0
    for header, payload in _frames(data):
        if header.get("base") != base or header.get("seq") != expected:
            break  # a log of an older snapshot, or a gap: nothing after it belongs to this one
        expected += 1
        if header["seq"] == 0:  # the start of this snapshot's log
            continue
        dead = set(header["dead"])
        ids = header["ids"]
        live = [s for i, s in enumerate(ids) if i not in dead]
        spec = header["spec"].encode()
        size = _spec_dtype(spec).itemsize if spec != codec.spec else codec.dtype.itemsize
        rows = [payload[i * size:(i + 1) * size] for i in range(len(live))]
        if spec != codec.spec:  # written by a version with other columns
            rows = codec.upgrade(spec, rows)
            if rows is None:
                log.error("checkpoint deltas of another layout cannot be applied; the state is the snapshot's",
                          extra={"fields": {"path": where, "seq": header["seq"]}})
                break
        table.remove([s for i, s in enumerate(ids) if i in dead])
        codec.import_rows(table, live, rows, with_touch=True)
        table.set_counters(header["clock"], header["watermark"], header["evictions"])
        applied += 1
    return applied


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
            old = _spec_dtype(spec)
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

    def import_rows(self, table: StreamTable, stream_ids: list[str], rows: list[bytes],
                    with_touch: bool = False) -> None:
        """Put rows into ``table`` (streams created or overwritten). ``touch`` (the LRU clock)
        is this table's own unless ``with_touch`` (the rows come with the clock they are on)."""
        if not stream_ids:
            return
        data = np.frombuffer(b"".join(rows), self.dtype)
        slots = table.assign(stream_ids, data["last_seen"]).slots
        for name in self.columns:
            if with_touch or name != "touch":
                table.column(name)[slots] = data[name]


def _spec_dtype(spec: bytes) -> np.dtype:
    """The packed row dtype a layout spec (:attr:`RowCodec.spec`) describes."""
    return np.dtype([(n, np.dtype(d), tuple(shape)) for n, d, shape in json.loads(spec)])


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
    rows before offsets are committed); ``read_records(topic, partition)`` yields every
    record of a changelog partition as ``(key, value, headers)`` (:func:`confluent_records`,
    or :func:`kafka_python_records` over a group-less KafkaConsumer); ``inputs`` lists every
    input (topic, partition) in a fixed order.
    """

    kind = "changelog"

    def __init__(self, topic: str, producer, read_records: Callable, inputs: list[tuple[str, int]]) -> None:
        self.topic = topic
        self.producer = producer
        self.read_records = read_records
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

    def write(self, prepared, send: Callable | None = None) -> tuple[str, int]:
        """Send prepared rows with ``send(topic, key, value, partition, headers)`` (default:
        the producer's ``send``); the caller waits for their acknowledgements. Returns
        ``("rows", bytes of row values sent)``."""
        part, (layout, spec), names, rows = prepared
        if send is None:
            def send(topic, key, value, partition, headers):
                self.producer.send(topic, key=key, value=value, partition=partition, headers=headers)
        headers = [(LAYOUT_HEADER, layout)]
        if names:  # the layout's spec once per checkpoint, not in every row's headers (3x the row)
            send(self.topic, SPEC_KEY_PREFIX + layout, spec, part, headers)
        for sid, row in zip(names, rows):
            send(self.topic, sid.encode(), row, part, headers)
        return "rows", sum(len(r) for r in rows if r is not None) + (len(spec) if names else 0)

    def load(self, topic: str, partition: int, new_detector: Callable[..., Detector]) -> Detector:
        """Rebuild the partition's detector from its changelog partition (last row per stream)."""
        det = new_detector()
        codec = RowCodec(det.table)
        part = changelog_partition(self.inputs, topic, partition)
        latest: dict[str, tuple | None] = {}  # the last record per stream: (layout, spec, row)
        specs: dict[bytes, bytes] = {}  # layout hash -> its spec, from the spec records
        t0 = time.perf_counter()
        end = 0
        for end, (key, value, headers) in enumerate(self.read_records(self.topic, part), start=1):
            if key[:1] == SPEC_KEY_PREFIX:
                specs[key[1:]] = value
            elif value is None:
                latest[key.decode()] = None
            else:
                headers = dict(headers or [])  # rows before spec records carry their spec here
                latest[key.decode()] = (headers.get(LAYOUT_HEADER), headers.get(LAYOUT_SPEC_HEADER), value)
        held = {}
        for k, v in latest.items():
            if v is not None:
                layout, spec, row = v
                held[k] = (layout, specs.get(layout) if spec is None else spec, row)
        rows, upgraded, foreign = _current_rows(codec, held)
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


#: How long a changelog read waits for more records once it is at the partition's reported end
#: (once per partition restored: a rebalance that assigns many partitions pays it for each).
_IDLE_S = 0.1


def kafka_python_records(consumer_factory: Callable) -> Callable:
    """A ``read_records`` for :class:`ChangelogStore` over ``consumer_factory()``, a group-less
    kafka-python consumer. It reads until the partition's end offset is reached *and* a poll
    brings nothing more: the development broker reports an end offset short of the records
    it serves (the last batch's first offset + 1), and trusting it lost that batch's rows."""
    def read(topic: str, partition: int):
        from kafka import TopicPartition

        tp = TopicPartition(topic, partition)
        consumer = consumer_factory()
        try:
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            end = consumer.end_offsets([tp])[tp]
            while True:
                records = consumer.poll(timeout_ms=int(1000 * _IDLE_S)).get(tp, [])
                for rec in records:
                    yield rec.key, rec.value, rec.headers
                if not records and consumer.position(tp) >= end:
                    return
        finally:
            consumer.close()
    return read


def confluent_records(settings: dict) -> Callable:
    """A ``read_records`` for :class:`ChangelogStore` on librdkafka (``settings``: connection
    and security settings): records parsed in C, about 3.5x kafka-python's rate here
    (a 200k-row partition: 109k vs 31k rows/s). Same end rule as :func:`kafka_python_records`."""
    def read(topic: str, partition: int):
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

        try:
            consumer = Consumer({**settings, "group.id": "streamrnn-changelog-restore",
                                 "enable.auto.commit": False, "fetch.wait.max.ms": 20})
        except KafkaException as exc:
            raise DaemonError(f"cannot create the changelog reader: {exc}") from None
        try:
            consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
            try:
                _low, end = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)
            except KafkaException as exc:
                raise DaemonError(f"cannot read changelog {topic}[{partition}]: {exc}") from None
            position = 0
            while True:
                messages = consumer.consume(10_000, _IDLE_S)
                for m in messages:
                    if m.error() is not None:
                        raise DaemonError(f"cannot read changelog {topic}[{partition}]: {m.error()}")
                    position = m.offset() + 1
                    yield m.key(), m.value(), m.headers()
                if not messages and position >= end:
                    return
        finally:
            consumer.close()
    return read
