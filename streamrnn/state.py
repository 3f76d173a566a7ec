"""Per-stream state: stream id -> slot, the state arrays, eviction and snapshots.

A :class:`StreamTable` gives every stream (a metric series keyed by a string id) a *slot*:
a row in a set of per-stream NumPy columns (a recurrent net's hidden state, its last
prediction, scorer statistics, ...). The id index is a hash table kept in NumPy arrays
and probed by the Numba kernels of :mod:`streamrnn.kernels.idmap`, so a million streams
cost a few tens of bytes each on top of their state, and a batch of ids is resolved by one
kernel call instead of one Python dict lookup per event.
"""

from __future__ import annotations

import json
import mmap
import time
from dataclasses import dataclass
from itertools import accumulate

import crc32c
import numpy as np
import pyarrow as pa

from streamrnn.errors import StreamrnnError
from streamrnn.kernels import idmap

__all__ = ["Assignment", "Column", "StreamTable", "StreamTableError"]


class StreamTableError(StreamrnnError):
    """A bad argument to, or a bad snapshot for, a :class:`StreamTable`.

    A subclass of :class:`ValueError` (through :class:`streamrnn.errors.StreamrnnError`).
    """


#: Names of the columns every table has; callers cannot use them for their own columns.
BUILTIN = ("last_seen", "last_offset", "touch")
#: Name of the ids' field in a snapshot.
ID_FIELD = "stream_id"
_RESERVED = (ID_FIELD, *BUILTIN)
_INT64_MIN = np.iinfo(np.int64).min
#: Schema metadata key of a snapshot and the format version written under it.
_META_KEY = b"streamrnn.state"
_FORMAT = "streamrnn.state"
_VERSION = 1


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


#: Arrays at least this big get their own anonymous memory map (see ``_empty``).
_MMAP_MIN_BYTES = 1 << 20
#: ... and at least this big are also offered transparent huge pages (fewer TLB misses
#: on random slot access; resident memory grows in 2 MiB steps).
_HUGEPAGE_MIN_BYTES = 4 << 20


def _empty(shape, dtype) -> np.ndarray:
    """Like ``np.empty``: pages are resident only once written.

    Large arrays are mapped directly instead of going through malloc. glibc raises its
    mmap threshold each time it frees a large mapped block (up to 32 MiB), after which
    blocks of that size come from the heap and, once freed, stay resident; with a table
    that keeps reallocating as it grows this retained ~50 bytes per stream at a million
    streams. Our own mapping is returned to the OS when the array is dropped.
    """
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < _MMAP_MIN_BYTES:
        return np.empty(shape, dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    if nbytes >= _HUGEPAGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # kernel without transparent huge pages
            pass
    return np.frombuffer(buf, dtype).reshape(shape)


#: Batches at least this long are looked up on all threads; waking the pool for fewer
#: events costs more than it saves.
_PARALLEL_LOOKUP_MIN = 8192


def _full(shape, fill, dtype) -> np.ndarray:
    out = _empty(shape, dtype)
    out.fill(fill)
    return out


def _copy_head(arr: np.ndarray, n: int) -> np.ndarray:
    """An array shaped like ``arr`` whose first ``n`` rows are copied; the rest, never read
    before being written, stay unwritten (not resident)."""
    out = _empty(arr.shape, arr.dtype)
    out[:n] = arr[:n]
    return out


class Column:
    """Specification of one per-stream column.

    Parameters
    ----------
    shape : tuple of int
        Shape of one stream's value; ``()`` for a scalar. The table's array has shape
        ``(capacity, *shape)``.
    dtype : numpy dtype-like
        A boolean, integer or floating dtype.
    fill : scalar or array-like
        Value a stream's row is (re)set to when the stream gets a slot; broadcast to
        ``shape``. Kept bit-exact (a NaN payload survives snapshots).
    """

    __slots__ = ("shape", "dtype", "fill")

    def __init__(self, shape, dtype, fill=0):
        try:
            shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise StreamTableError(f"Column shape must be a tuple of ints, got {shape!r}") from None
        if any(d < 1 for d in shape):
            raise StreamTableError(f"Column shape must have positive sizes, got {shape!r}")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise StreamTableError(f"Column dtype {dtype!r} is not a NumPy dtype") from None
        if dtype.kind not in "biuf" or not dtype.isnative:
            raise StreamTableError(
                f"Column dtype must be a native-endian bool, integer or float dtype, got {dtype}"
            )
        try:
            fill = np.broadcast_to(np.asarray(fill, dtype=dtype), shape).copy()
        except (TypeError, ValueError, OverflowError) as exc:
            raise StreamTableError(
                f"Column fill {fill!r} does not fit dtype {dtype} and shape {shape}: {exc}"
            ) from None
        fill.flags.writeable = False
        self.shape: tuple[int, ...] = shape
        self.dtype: np.dtype = dtype
        self.fill: np.ndarray = fill

    @property
    def width(self) -> int:
        """Number of values per stream (product of ``shape``)."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes_per_stream(self) -> int:
        return self.width * self.dtype.itemsize

    def _to_json(self) -> dict:
        # The fill goes in as raw bytes so that NaN payloads and -0.0 survive.
        return {"shape": list(self.shape), "dtype": self.dtype.name, "fill": self.fill.tobytes().hex()}

    @classmethod
    def _from_json(cls, spec: dict) -> Column:
        dtype = np.dtype(spec["dtype"])
        shape = tuple(spec["shape"])
        fill = np.frombuffer(bytes.fromhex(spec["fill"]), dtype=dtype).reshape(shape)
        return cls(shape, dtype, fill)

    def __eq__(self, other):
        if not isinstance(other, Column):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.dtype == other.dtype
            and self.fill.tobytes() == other.fill.tobytes()
        )

    def __repr__(self):
        fill = self.fill.item() if self.fill.ndim == 0 else self.fill.tolist()
        return f"Column(shape={self.shape}, dtype={self.dtype.name}, fill={fill!r})"


@dataclass(frozen=True, slots=True)
class Assignment:
    """Result of :meth:`StreamTable.assign`.

    Attributes
    ----------
    slots : ndarray of int64, shape (E,)
        Slot of each event's stream.
    new : ndarray of bool, shape (E,)
        True exactly for the first event in the batch of a stream that had no slot before
        the call.
    evicted : list of str
        Ids evicted (least recently used first) to make room for the batch's new streams.
    """

    slots: np.ndarray
    new: np.ndarray
    evicted: list[str]


_BUILTIN_SPECS = {
    # Max event timestamp seen (epoch ms); always written when a stream gets a slot.
    "last_seen": Column((), np.int64, _INT64_MIN),
    # Last Kafka offset applied to this stream's state; -1 = none yet.
    "last_offset": Column((), np.int64, -1),
    # LRU clock: the assign() call that last saw the stream.
    "touch": Column((), np.int64, 0),
}


class StreamTable:
    """Stream id -> slot index plus per-stream state columns, with LRU and idle eviction.

    Parameters
    ----------
    columns : dict of str to Column
        The caller's per-stream columns. Every table also has the built-in int64 columns
        ``last_seen`` (max event timestamp in epoch ms), ``last_offset`` (last input
        offset applied, -1 = none; written by the caller) and ``touch`` (the number of the
        :meth:`assign` call that last saw the stream; drives LRU eviction, independent of
        event time).
    max_streams : int, optional
        Most live streams. When a batch brings new streams into a full table, exactly as
        many least recently assigned streams are evicted as needed (never one in the
        batch; ties broken by a hash of the id, so the choice does not depend on slots).
        None = unbounded.
    idle_timeout_ms : int, optional
        Streams whose ``last_seen`` is older than ``now_ms - idle_timeout_ms`` are removed
        by :meth:`evict_idle`. None disables idle eviction.
    capacity : int, default 1024
        Initial number of slots; grows by doubling. Capacity is allocated lazily (like
        ``np.empty``) and is not resident memory until a stream is assigned to it.

    Notes
    -----
    Slots of evicted or removed streams are reused; a slot's row in every column is reset
    to the column's fill when a stream is assigned to it. When :meth:`assign` gets no
    timestamps, ``last_seen`` of known streams is left alone and a new stream starts at
    the largest timestamp the table has seen so far (its event-time watermark), or at the
    wall clock if it has never seen one: a new stream is then as fresh as the newest
    event, neither idle at once nor dated in the future of a replay.

    Not thread-safe: one owner calls it at a time.

    Examples
    --------
    >>> import numpy as np
    >>> from streamrnn.state import Column, StreamTable
    >>> table = StreamTable({"h": Column((4,), np.float32, 0.0)}, max_streams=2)
    >>> a = table.assign(["cpu", "mem", "cpu"], timestamps=[1000, 1000, 2000])
    >>> a.slots.tolist(), a.new.tolist()
    ([0, 1, 0], [True, True, False])
    >>> table.column("h")[a.slots[0]] += 1.0
    >>> b = table.assign(["cpu", "disk"])     # full: "mem" is the least recently used
    >>> b.evicted, b.new.tolist(), table.ids()
    (['mem'], [False, True], ['cpu', 'disk'])
    >>> restored = StreamTable.restore(table.snapshot())
    >>> restored.column("h")[restored.slot_of("cpu")].tolist()
    [1.0, 1.0, 1.0, 1.0]
    """

    def __init__(
        self,
        columns: dict[str, Column],
        *,
        max_streams: int | None = None,
        idle_timeout_ms: int | None = None,
        capacity: int = 1024,
    ):
        if not isinstance(columns, dict):
            raise StreamTableError(f"columns must be a dict of name -> Column, got {type(columns).__name__}")
        for name, spec in columns.items():
            if not isinstance(name, str) or not name:
                raise StreamTableError(f"column names must be non-empty str, got {name!r}")
            if name in _RESERVED:
                raise StreamTableError(
                    f"column name {name!r} is reserved (built-in names: {', '.join(_RESERVED)}); rename it"
                )
            if not isinstance(spec, Column):
                raise StreamTableError(f"column {name!r} must be a Column, got {type(spec).__name__}")
        self._max_streams = _check_optional_int("max_streams", max_streams, minimum=1)
        self._idle_timeout_ms = _check_optional_int("idle_timeout_ms", idle_timeout_ms, minimum=0)
        capacity = _check_optional_int("capacity", capacity, minimum=1)
        if capacity is None:
            raise StreamTableError("capacity must be a positive int, got None")

        self._specs: dict[str, Column] = {**_BUILTIN_SPECS, **columns}
        self._capacity = capacity
        self._cols = {name: _empty((capacity, *spec.shape), spec.dtype) for name, spec in self._specs.items()}
        self._id_ref = _empty(capacity, np.int64)  # written when a slot is handed out
        self._free = _empty(capacity, np.int64)  # free-slot stack; resident only once used
        # Sized by live streams, not capacity, so that a large capacity hint costs nothing
        # until streams arrive (the table is written in full, so it is resident).
        self._table = _full(2048, idmap.EMPTY, np.int64)
        self._arena = _empty(16 * capacity, np.uint8)
        self._meta = np.zeros(idmap.META_SIZE, np.int64)
        self._clock = 0
        self._watermark: int | None = None
        self._evictions = 0

    # ------------------------------------------------------------------ properties

    @property
    def columns(self) -> dict[str, Column]:
        """Specs of all columns, built-in ones first."""
        return dict(self._specs)

    @property
    def capacity(self) -> int:
        """Slots currently allocated (rows of every column array)."""
        return self._capacity

    @property
    def max_streams(self) -> int | None:
        return self._max_streams

    @property
    def idle_timeout_ms(self) -> int | None:
        return self._idle_timeout_ms

    @property
    def evictions(self) -> int:
        """Streams evicted so far (LRU and idle; :meth:`remove` does not count)."""
        return self._evictions

    @property
    def state_nbytes_per_stream(self) -> int:
        """Bytes of all columns, built-in ones included, for one stream."""
        return sum(spec.nbytes_per_stream for spec in self._specs.values())

    @property
    def index_nbytes(self) -> int:
        """Bytes allocated for the id index (hash table, id references, id bytes, free
        list); resident only where written."""
        return self._table.nbytes + self._id_ref.nbytes + self._arena.nbytes + self._free.nbytes

    def __len__(self) -> int:
        return int(self._meta[idmap.M_LIVE])

    def __repr__(self) -> str:
        user = {k: v for k, v in self._specs.items() if k not in BUILTIN}
        return (
            f"StreamTable({len(self)} streams, capacity={self._capacity}, columns={user}, "
            f"max_streams={self._max_streams}, idle_timeout_ms={self._idle_timeout_ms})"
        )

    # ------------------------------------------------------------------ assignment

    def assign(self, stream_ids, timestamps=None) -> Assignment:
        """Resolve a batch of events' stream ids to slots, creating slots for new streams.

        Parameters
        ----------
        stream_ids : list of str, ndarray of str, pyarrow string array
            One non-empty id per event; repeats are fine. A ``pa.StringArray`` /
            ``pa.LargeStringArray`` is used without copying.
        timestamps : array-like of int, optional
            Event times in epoch ms, one per event; ``last_seen`` of each stream becomes
            the max of its old value and its events' times.

        Returns
        -------
        Assignment
            ``slots``, ``new`` and ``evicted``. Column arrays may have been reallocated:
            fetch them again with :meth:`column`.

        Raises
        ------
        StreamTableError
            For a bad id or timestamp, or when the batch alone holds more distinct
            streams than ``max_streams``. The table is unchanged when it raises.
        """
        data, offsets = _encode_ids(stream_ids)
        n_events = offsets.shape[0] - 1
        ts = _check_timestamps(timestamps, n_events)
        slots, tags = self._find(data, offsets)
        new = np.zeros(n_events, np.bool_)
        evicted: list[str] = []
        clock = self._clock + 1

        unknown = np.flatnonzero(slots < 0)
        if unknown.size:
            scratch = np.full(_pow2_at_least(2 * unknown.size), idmap.EMPTY, np.int64)
            first = np.empty(unknown.size, np.int64)
            n_new = idmap.dedupe(data, offsets, tags, unknown, scratch, first)
            new_events = unknown[first == unknown]
            new_bytes = int((offsets[new_events + 1] - offsets[new_events]).sum())
            excess = len(self) + n_new - (self._max_streams or np.iinfo(np.int64).max)
            if excess > 0:
                known = np.unique(slots[slots >= 0])
                if known.size + n_new > self._max_streams:
                    raise StreamTableError(
                        f"one assign() batch holds {known.size + n_new} distinct streams but "
                        f"max_streams={self._max_streams}; raise max_streams or split the batch"
                    )
                victims = self._lru_victims(excess, known)
                evicted = self._ids_of(victims)
                self._forget(victims)
                self._evictions += victims.size
            self._reserve(n_new, new_bytes)
            idmap.insert(
                self._table, self._id_ref, self._arena, self._free, self._meta,
                data, offsets, tags, unknown, first, slots,
            )
            new[new_events] = True
            new_slots = slots[new_events]
            for name, spec in self._specs.items():
                self._cols[name][new_slots] = spec.fill
            if ts is None:
                start = self._watermark if self._watermark is not None else int(time.time() * 1000)
                self._cols["last_seen"][new_slots] = start

        use_ts = ts is not None
        idmap.touch(
            slots, self._cols["touch"], clock, self._cols["last_seen"],
            ts if use_ts else np.empty(0, np.int64), use_ts,
        )
        if use_ts and n_events:
            top = int(ts.max())
            self._watermark = top if self._watermark is None else max(self._watermark, top)
        self._clock = clock
        return Assignment(slots, new, evicted)

    def _find(self, data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots (-1 = unknown) and hash tags of a batch of encoded ids."""
        n = offsets.shape[0] - 1
        slots = np.empty(n, np.int64)
        tags = np.empty(n, np.int64)
        kernel = idmap.lookup if n >= _PARALLEL_LOOKUP_MIN else idmap.lookup_serial
        kernel(self._table, self._id_ref, self._arena, data, offsets, slots, tags, np.empty(n, np.int64))
        return slots, tags

    def _lru_victims(self, n: int, exclude: np.ndarray) -> np.ndarray:
        """The ``n`` least recently touched live slots outside ``exclude``, oldest first.

        Order: touch, then the id's 64-bit hash, then the id itself, so that a restored
        table (whose slots differ) evicts the same streams as the original would.
        """
        high = int(self._meta[idmap.M_HIGH_WATER])
        candidate = self._id_ref[:high] != 0
        candidate[exclude] = False
        cand = np.flatnonzero(candidate)
        touch = self._cols["touch"][cand]
        if n < cand.size:
            kth = np.partition(touch, n - 1)[n - 1]
            chosen = cand[touch < kth]
            ties = cand[touch == kth]
            need = n - chosen.size
            if need < ties.size:
                ties = self._first_by_id(ties, need)
            cand = np.concatenate([chosen, ties])
        h = np.empty(cand.size, np.uint64)
        idmap.id_hashes(self._id_ref, self._arena, cand, h)
        return cand[np.lexsort((h, self._cols["touch"][cand]))]

    def _first_by_id(self, slots: np.ndarray, n: int) -> np.ndarray:
        """The ``n`` slots of ``slots`` first in (hash of id, id) order."""
        h = np.empty(slots.size, np.uint64)
        idmap.id_hashes(self._id_ref, self._arena, slots, h)
        kth = np.partition(h, n - 1)[n - 1]
        chosen = slots[h < kth]
        same = slots[h == kth]
        if chosen.size + same.size > n:  # a 64-bit hash collision at the cut: order by id
            ids = self._ids_of(same)
            same = same[np.argsort([s.encode() for s in ids], kind="stable")]
        return np.concatenate([chosen, same[: n - chosen.size]])

    def _reserve(self, n_new: int, new_bytes: int) -> None:
        """Make room for ``n_new`` streams with ``new_bytes`` of ids: slots, hash table
        (load <= 1/2, where linear probing stays short) and arena."""
        meta = self._meta
        from_free = min(n_new, int(meta[idmap.M_N_FREE]))
        need_slots = int(meta[idmap.M_HIGH_WATER]) + n_new - from_free
        if need_slots > self._capacity:
            cap = self._capacity
            while cap < need_slots:
                cap *= 2
            self._grow_slots(cap)
        live = int(meta[idmap.M_LIVE]) + n_new
        if 2 * live > self._table.shape[0]:
            table = _full(_pow2_at_least(2 * live), idmap.EMPTY, np.int64)
            idmap.rebuild(self._table, table)
            self._table = table
        used = int(meta[idmap.M_ARENA_USED])
        if used + new_bytes > self._arena.shape[0]:
            garbage = int(meta[idmap.M_GARBAGE])
            if 2 * garbage >= used and used - garbage + new_bytes <= self._arena.shape[0]:
                self._compact_arena(self._arena)
            else:
                size = max(2 * self._arena.shape[0], 2 * (used - garbage + new_bytes))
                self._compact_arena(_empty(size, np.uint8))

    def _compact_arena(self, target: np.ndarray) -> None:
        """Move the live ids to the front of ``target`` (which may be the arena itself),
        dropping the bytes of freed ids."""
        high = int(self._meta[idmap.M_HIGH_WATER])
        used = idmap.compact_arena(self._arena, self._id_ref, high, target, target is self._arena)
        self._arena = target
        self._meta[idmap.M_ARENA_USED] = used
        self._meta[idmap.M_GARBAGE] = 0

    def _grow_slots(self, cap: int) -> None:
        high = int(self._meta[idmap.M_HIGH_WATER])
        for name, spec in self._specs.items():
            grown = _empty((cap, *spec.shape), spec.dtype)
            grown[:high] = self._cols[name][:high]
            self._cols[name] = grown
        id_ref = _empty(cap, np.int64)
        id_ref[:high] = self._id_ref[:high]
        self._id_ref = id_ref
        n_free = int(self._meta[idmap.M_N_FREE])
        free = _empty(cap, np.int64)
        free[:n_free] = self._free[:n_free]
        self._free = free
        self._capacity = cap

    # ------------------------------------------------------------------ removal

    def _forget(self, slots: np.ndarray) -> None:
        idmap.remove(self._table, self._id_ref, self._arena, self._free, self._meta, slots)

    def remove(self, stream_ids) -> int:
        """Forget these streams; unknown ids are ignored. Returns how many were removed."""
        data, offsets = _encode_ids(stream_ids)
        slots, _ = self._find(data, offsets)
        found = np.unique(slots[slots >= 0])
        self._forget(found)
        return int(found.size)

    def evict_idle(self, now_ms: int) -> list[str]:
        """Remove streams whose ``last_seen < now_ms - idle_timeout_ms``; returns their ids."""
        if self._idle_timeout_ms is None:
            raise StreamTableError("evict_idle() needs idle_timeout_ms; pass it to StreamTable(...)")
        now_ms = _check_optional_int("now_ms", now_ms)
        if now_ms is None:
            raise StreamTableError("now_ms must be an int (epoch ms), got None")
        high = int(self._meta[idmap.M_HIGH_WATER])
        idle = (self._id_ref[:high] != 0) & (self._cols["last_seen"][:high] < now_ms - self._idle_timeout_ms)
        slots = np.flatnonzero(idle)
        ids = self._ids_of(slots)
        self._forget(slots)
        self._evictions += slots.size
        return ids

    @property
    def counters(self) -> tuple[int, int | None, int]:
        """``(clock, watermark, evictions)``: the table-wide values a snapshot carries besides
        the rows (LRU clock, event-time watermark, eviction count)."""
        return self._clock, self._watermark, self._evictions

    def set_counters(self, clock: int, watermark: int | None, evictions: int) -> None:
        """Set what :attr:`counters` returns: for state stores that rebuild a table from
        rows (whose ``touch`` values are on that clock) rather than from a snapshot."""
        self._clock = int(clock)
        self._watermark = None if watermark is None else int(watermark)
        self._evictions = int(evictions)

    # ------------------------------------------------------------------ queries

    def add_column(self, name: str, spec: Column, existing=None) -> None:
        """Add a column to a table that already holds streams: their rows are set to
        ``existing`` (default ``spec.fill``), streams assigned later start at ``spec.fill``.
        Lets a snapshot written before a column existed be continued by a newer version."""
        if not isinstance(name, str) or not name or name in _RESERVED:
            raise StreamTableError(f"column name {name!r} is empty or reserved; rename it")
        if name in self._specs:
            raise StreamTableError(f"column {name!r} already exists")
        if not isinstance(spec, Column):
            raise StreamTableError(f"column {name!r} must be a Column, got {type(spec).__name__}")
        col = _empty((self._capacity, *spec.shape), spec.dtype)
        try:
            col[...] = spec.fill if existing is None else np.asarray(existing, spec.dtype)
        except (TypeError, ValueError) as exc:
            raise StreamTableError(f"column {name!r}: existing value {existing!r} does not fit: {exc}") from None
        self._specs[name] = spec
        self._cols[name] = col

    def column(self, name: str) -> np.ndarray:
        """The live array of a column, shape ``(capacity, *shape)``; rows of slots not in
        use hold garbage. Fetch it again after :meth:`assign`, which may reallocate it."""
        try:
            return self._cols[name]
        except (KeyError, TypeError):
            raise StreamTableError(f"no column {name!r}; columns: {', '.join(self._specs)}") from None

    def column_arrays(self, names) -> list[np.ndarray]:
        """The live arrays of several columns at once (see :meth:`column`)."""
        try:
            cols = self._cols
            return [cols[name] for name in names]
        except (KeyError, TypeError):
            for name in names:
                self.column(name)  # raises, naming the first missing column
            raise

    def lookup(self, stream_ids) -> np.ndarray:
        """Slots (int64, -1 = unknown) of a batch of ids, without assigning or touching
        anything."""
        slots, _ = self._find(*_encode_ids(stream_ids))
        return slots

    def slot_of(self, stream_id: str) -> int | None:
        """Slot of a stream, or None when the table does not hold it."""
        slots, _ = self._find(*_encode_ids([stream_id]))
        return None if slots[0] < 0 else int(slots[0])

    def __contains__(self, stream_id) -> bool:
        if not isinstance(stream_id, str) or not stream_id:
            return False
        return self.slot_of(stream_id) is not None

    def id_of(self, slot: int) -> str:
        """Id of the stream in ``slot``."""
        high = int(self._meta[idmap.M_HIGH_WATER])
        if not isinstance(slot, (int, np.integer)) or not 0 <= slot < high or self._id_ref[slot] == 0:
            raise StreamTableError(f"slot {slot!r} holds no stream")
        return self._ids_of(np.array([slot], np.int64))[0]

    def _live_slots(self) -> np.ndarray:
        return np.flatnonzero(self._id_ref[: int(self._meta[idmap.M_HIGH_WATER])] != 0)

    def ids(self) -> list[str]:
        """Ids of the live streams, in slot order."""
        return self._ids_of(self._live_slots())

    def _id_array(self, slots: np.ndarray) -> pa.Array:
        """The ids of ``slots`` as an Arrow string array, built without Python strs."""
        lengths = np.empty(slots.size, np.int64)
        idmap.id_lengths(self._id_ref, slots, lengths)
        total = int(lengths.sum())
        large = total > np.iinfo(np.int32).max
        out = np.empty(total, np.uint8)
        offsets = np.empty(slots.size + 1, np.int64 if large else np.int32)
        idmap.gather_ids(self._arena, self._id_ref, slots, out, offsets)
        kind = pa.large_string() if large else pa.string()
        return pa.Array.from_buffers(kind, slots.size, [None, pa.py_buffer(offsets), pa.py_buffer(out)])

    def _ids_of(self, slots: np.ndarray) -> list[str]:
        if slots.size == 0:
            return []
        return self._id_array(np.ascontiguousarray(slots, np.int64)).to_pylist()

    # ------------------------------------------------------------------ copies

    def copy(self) -> StreamTable:
        """An independent table with the same streams, columns, LRU clock, watermark and
        settings. Only memory copies of the rows in use (no encoding): a checkpoint takes one
        on the scoring thread and encodes its :meth:`snapshot` on another while this table
        goes on changing."""
        high = int(self._meta[idmap.M_HIGH_WATER])
        new = object.__new__(StreamTable)
        new._max_streams = self._max_streams
        new._idle_timeout_ms = self._idle_timeout_ms
        new._specs = dict(self._specs)
        new._capacity = self._capacity
        new._cols = {name: _copy_head(col, high) for name, col in self._cols.items()}
        new._id_ref = _copy_head(self._id_ref, high)
        new._free = _copy_head(self._free, int(self._meta[idmap.M_N_FREE]))
        new._table = _copy_head(self._table, self._table.shape[0])
        new._arena = _copy_head(self._arena, int(self._meta[idmap.M_ARENA_USED]))
        new._meta = self._meta.copy()
        new._clock = self._clock
        new._watermark = self._watermark
        new._evictions = self._evictions
        return new

    # ------------------------------------------------------------------ snapshots

    def snapshot(self) -> bytes:
        """The table as Arrow IPC stream bytes: one row per live stream.

        Fields: ``stream_id`` (utf-8 string), the built-in columns, then the caller's;
        a column with a non-scalar shape is a fixed-size list of its flattened values.
        The schema metadata (key ``streamrnn.state``) holds the column specs, the LRU
        clock, the event-time watermark, the settings and a CRC32C of the contents.
        """
        slots = self._live_slots()
        ids = self._id_array(slots)
        arrays = [ids]
        fields = [pa.field(ID_FIELD, ids.type, nullable=False)]
        values = {}
        for name, spec in self._specs.items():
            vals = np.ascontiguousarray(self._cols[name][slots])
            values[name] = vals
            arrays.append(_to_arrow(vals, spec))
            fields.append(pa.field(name, arrays[-1].type, nullable=False))
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "rows": int(slots.size),
            "columns": {name: spec._to_json() for name, spec in self._specs.items()},
            "clock": self._clock,
            "watermark": self._watermark,
            "evictions": self._evictions,
            "max_streams": self._max_streams,
            "idle_timeout_ms": self._idle_timeout_ms,
        }
        meta["crc32c"] = _checksum(meta, ids, values)
        schema = pa.schema(fields, metadata={_META_KEY: json.dumps(meta).encode()})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as writer:
            writer.write_batch(pa.record_batch(arrays, schema=schema))
        return sink.getvalue().to_pybytes()

    @classmethod
    def restore(cls, data: bytes, *, max_streams=..., idle_timeout_ms=...) -> StreamTable:
        """A table from :meth:`snapshot` bytes; the columns come from the snapshot.

        Parameters
        ----------
        data : bytes
            Snapshot bytes.
        max_streams, idle_timeout_ms : int or None, optional
            Override the snapshot's settings; ``...`` (the default) keeps them.

        Raises
        ------
        StreamTableError
            When the bytes are not a complete, intact snapshot, or hold more streams
            than ``max_streams``.
        """
        try:
            reader = pa.ipc.open_stream(pa.py_buffer(data))
            arrow = reader.read_all()
        except (pa.ArrowException, OSError, TypeError, ValueError) as exc:
            raise StreamTableError(
                f"not a readable StreamTable snapshot (truncated or corrupt Arrow IPC stream): {exc}"
            ) from None
        try:
            return cls._restore(arrow, max_streams, idle_timeout_ms)
        except StreamTableError:
            raise
        except (pa.ArrowException, ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
            # A damaged schema can fail anywhere (names that are not utf-8, odd types):
            # report it as a bad snapshot, not as a traceback from deep inside pyarrow.
            raise StreamTableError(f"corrupt StreamTable snapshot: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _restore(cls, arrow: pa.Table, max_streams, idle_timeout_ms) -> StreamTable:
        meta, specs = _read_meta(arrow.schema)
        if max_streams is ...:
            max_streams = meta["max_streams"]
        if idle_timeout_ms is ...:
            idle_timeout_ms = meta["idle_timeout_ms"]
        n = arrow.num_rows
        if n != meta["rows"]:
            raise StreamTableError(f"truncated StreamTable snapshot: {n} of {meta['rows']} rows present")
        if max_streams is not None and n > max_streams:
            raise StreamTableError(
                f"snapshot holds {n} streams but max_streams={max_streams}; "
                f"restore with max_streams>={n} or None"
            )
        try:
            ids = arrow.column(ID_FIELD).combine_chunks()
            values = {
                name: _from_arrow(arrow.column(name).combine_chunks(), spec, n) for name, spec in specs.items()
            }
        except (pa.ArrowException, ValueError, TypeError, KeyError) as exc:
            raise StreamTableError(f"corrupt StreamTable snapshot: {exc}") from None
        if not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
            raise StreamTableError(f"corrupt StreamTable snapshot: {ID_FIELD} has type {ids.type}, not string")
        if _checksum(meta, ids, values) != meta["crc32c"]:
            raise StreamTableError("corrupt StreamTable snapshot: checksum mismatch (the bytes were altered)")

        user = {name: spec for name, spec in specs.items() if name not in BUILTIN}
        table = cls(user, max_streams=max_streams, idle_timeout_ms=idle_timeout_ms, capacity=max(n, 1024))
        id_data, id_offsets = _encode_ids(ids)  # validates: no nulls, no empty ids
        slots, tags = table._find(id_data, id_offsets)
        events = np.arange(n, dtype=np.int64)
        first = np.empty(n, np.int64)
        scratch = np.full(_pow2_at_least(2 * n), idmap.EMPTY, np.int64)
        if idmap.dedupe(id_data, id_offsets, tags, events, scratch, first) != n:
            raise StreamTableError("corrupt StreamTable snapshot: a stream id appears twice")
        table._reserve(n, int(id_offsets[-1] - id_offsets[0]))
        idmap.insert(
            table._table, table._id_ref, table._arena, table._free, table._meta,
            id_data, id_offsets, tags, events, first, slots,
        )
        for name, vals in values.items():
            table._cols[name][:n] = vals
        table._clock = meta["clock"]
        table._watermark = meta["watermark"]
        table._evictions = meta["evictions"]
        return table


# ---------------------------------------------------------------------- helpers


def _check_optional_int(name, value, minimum=None):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise StreamTableError(f"{name} must be an int or None, got {value!r}")
    if minimum is not None and value < minimum:
        raise StreamTableError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_timestamps(timestamps, n: int) -> np.ndarray | None:
    if timestamps is None:
        return None
    if isinstance(timestamps, (pa.Array, pa.ChunkedArray)):
        if timestamps.null_count:
            raise StreamTableError("timestamps must not contain nulls")
        timestamps = timestamps.to_numpy(zero_copy_only=False)
    ts = np.asarray(timestamps)
    if ts.size == 0:  # np.asarray([]) is float64
        ts = ts.astype(np.int64)
    if ts.dtype.kind == "M":
        ts = ts.astype("datetime64[ms]").view(np.int64)
    elif ts.dtype.kind not in "iu" or ts.dtype == np.uint64:
        raise StreamTableError(f"timestamps must be integers (epoch ms), got dtype {ts.dtype}")
    if ts.shape != (n,):
        raise StreamTableError(f"timestamps must have one value per event: shape {ts.shape}, expected ({n},)")
    return np.ascontiguousarray(ts, np.int64)


def _encode_ids(stream_ids) -> tuple[np.ndarray, np.ndarray]:
    """Validated utf-8 bytes and Arrow offsets (int32 or int64) of a batch of ids.

    Python strs are converted by pyarrow in C: no Python work per id.
    """
    if isinstance(stream_ids, (str, bytes)):
        raise StreamTableError(
            f"stream_ids must be a sequence of ids, got a single {type(stream_ids).__name__} "
            f"{stream_ids!r}; wrap it in a list"
        )
    arr = stream_ids
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not isinstance(arr, pa.Array):
        if isinstance(arr, np.ndarray) and arr.dtype.kind not in "UO":
            raise StreamTableError(f"stream ids must be str; got an array of dtype {arr.dtype}")
        if not isinstance(arr, (list, tuple, np.ndarray)):
            arr = list(arr)
        try:
            if isinstance(arr, (list, tuple)) and arr and set(map(type, arr)) == {str}:
                fast = _encode_str_list(arr)
                if fast is not None:
                    return fast
            arr = pa.array(arr)  # type inference rejects a mix of str and non-str
        except (pa.ArrowException, UnicodeError, TypeError, ValueError) as exc:
            raise StreamTableError(_bad_id_message(stream_ids, exc)) from None
    if pa.types.is_string_view(arr.type):
        arr = arr.cast(pa.string())
    if len(arr) == 0:
        return _id_bytes(None), np.zeros(1, np.int32)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise StreamTableError(_bad_id_message(stream_ids, None, arr))
    if arr.null_count:
        first = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise StreamTableError(f"stream ids must be non-empty str; got None at position {first}")
    kind = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], kind, count=len(arr) + 1, offset=arr.offset * np.dtype(kind).itemsize)
    data = _id_bytes(bufs[2])
    lengths = np.diff(offsets)
    bad = np.flatnonzero((lengths <= 0) | (lengths > idmap.MAX_ID_BYTES))
    if bad.size:
        i = int(bad[0])
        if lengths[i] <= 0:
            raise StreamTableError(f"stream ids must be non-empty str; got '' at position {i}")
        raise StreamTableError(
            f"stream id at position {i} is {int(lengths[i])} utf-8 bytes; the limit is {idmap.MAX_ID_BYTES}"
        )
    return data, offsets


def _encode_str_list(ids: list | tuple) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`_encode_ids` of a non-empty list of str whose lengths are plainly valid, or
    None. The daemon calls it per partition and poll with a few dozen ids, where pyarrow's
    type inference and the NumPy length checks were most of its time (47 -> ~10 us at 36)."""
    lengths = list(map(len, ids))
    # A str of n code points is at most 4n utf-8 bytes.
    if min(lengths) == 0 or 4 * max(lengths) > idmap.MAX_ID_BYTES:
        return None  # the general path names the bad id
    if len(ids) > _SMALL_ID_BATCH:  # pyarrow's C loop wins on long lists
        arr = pa.array(ids, type=pa.string())  # raises UnicodeEncodeError for a lone surrogate
        bufs = arr.buffers()
        return _id_bytes(bufs[2]), np.frombuffer(bufs[1], np.int32, count=len(ids) + 1)
    encoded = list(map(str.encode, ids))  # raises UnicodeEncodeError for a lone surrogate
    offsets = np.fromiter(accumulate(map(len, encoded), initial=0), np.int32, len(ids) + 1)
    return _id_bytes(b"".join(encoded)), offsets


_SMALL_ID_BATCH = 4096


def _id_bytes(buf) -> np.ndarray:
    """The ids' utf-8 bytes as a read-only array, whichever path encoded them (bytes are
    read-only, pyarrow's buffers writable): one Numba signature for the id kernels, so a
    batch size the daemon's warm-up did not take loads no kernel mid-stream."""
    data = np.frombuffer(buf, np.uint8) if buf is not None else np.empty(0, np.uint8)
    data.flags.writeable = False
    return data


def _bad_id_message(stream_ids, exc, arr=None) -> str:
    """Name the first offending id (slow path, only on error)."""
    is_seq = isinstance(stream_ids, (list, tuple, np.ndarray))
    seq = arr.to_pylist() if arr is not None and not is_seq else stream_ids
    for i, s in enumerate(seq):
        if not isinstance(s, str):
            return f"stream ids must be non-empty str; got {type(s).__name__} {s!r} at position {i}"
        if not s:
            return f"stream ids must be non-empty str; got '' at position {i}"
        try:
            s.encode("utf-8")
        except UnicodeError:
            return f"stream id {s!r} at position {i} is not valid unicode (cannot be encoded as utf-8)"
    return f"stream ids must be non-empty str ({exc})"


def _to_arrow(vals: np.ndarray, spec: Column) -> pa.Array:
    if spec.shape == ():
        return pa.array(vals)
    flat = pa.array(vals.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, spec.width)


def _from_arrow(arr: pa.Array, spec: Column, n: int) -> np.ndarray:
    value_type = pa.from_numpy_dtype(spec.dtype)
    if spec.shape == ():
        if arr.type != value_type:
            raise ValueError(f"field has type {arr.type}, expected {value_type}")
        flat = arr
    else:
        if (
            not pa.types.is_fixed_size_list(arr.type)
            or arr.type.list_size != spec.width
            or arr.type.value_type != value_type
        ):
            raise ValueError(f"field has type {arr.type}, expected fixed_size_list<{value_type}>[{spec.width}]")
        if arr.null_count:
            raise ValueError("field has nulls")
        flat = arr.flatten()
    if flat.null_count or arr.null_count:
        raise ValueError("field has nulls")
    vals = flat.to_numpy(zero_copy_only=False)
    if vals.dtype != spec.dtype or vals.size != n * spec.width:
        raise ValueError(f"field holds {vals.size} {vals.dtype} values, expected {n * spec.width} {spec.dtype}")
    return vals.reshape((n, *spec.shape))


def _checksum(meta: dict, ids: pa.Array, values: dict[str, np.ndarray]) -> int:
    """CRC32C over the metadata (minus the checksum), the ids and every column's values.
    Catches bit flips in data buffers, which Arrow's reader does not check."""
    head = {k: v for k, v in meta.items() if k != "crc32c"}
    crc = crc32c.crc32c(json.dumps(head, sort_keys=True).encode())
    kind = np.int64 if pa.types.is_large_string(ids.type) else np.int32
    bufs = ids.buffers()
    offsets = np.frombuffer(bufs[1], kind, count=len(ids) + 1, offset=ids.offset * np.dtype(kind).itemsize)
    lengths = np.diff(offsets).astype(np.int64)
    crc = crc32c.crc32c(lengths, crc)
    if bufs[2] is not None and len(ids):
        crc = crc32c.crc32c(np.frombuffer(bufs[2], np.uint8)[offsets[0] : offsets[-1]], crc)
    for name in sorted(values):
        crc = crc32c.crc32c(np.ascontiguousarray(values[name]), crc)
    return crc


def _read_meta(schema: pa.Schema) -> tuple[dict, dict[str, Column]]:
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise StreamTableError("not a StreamTable snapshot: the Arrow schema lacks 'streamrnn.state' metadata")
    try:
        meta = json.loads(raw)
        if meta.get("format") != _FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        if meta.get("version") != _VERSION:
            raise ValueError(f"version {meta.get('version')!r}, this library reads version {_VERSION}")
        specs = {name: Column._from_json(spec) for name, spec in meta["columns"].items()}
        for key in ("rows", "clock", "evictions", "crc32c"):
            if not isinstance(meta[key], int) or meta[key] < 0:
                raise ValueError(f"{key}={meta[key]!r}")
        for key in ("watermark", "max_streams", "idle_timeout_ms"):
            if meta[key] is not None and not isinstance(meta[key], int):
                raise ValueError(f"{key}={meta[key]!r}")
    except (ValueError, KeyError, TypeError, AttributeError, StreamTableError) as exc:
        raise StreamTableError(f"corrupt StreamTable snapshot metadata: {exc}") from None
    for name, spec in _BUILTIN_SPECS.items():
        if specs.get(name) != spec:
            raise StreamTableError(f"corrupt StreamTable snapshot: built-in column {name!r} missing or changed")
    expected = [ID_FIELD, *specs]
    if schema.names != expected:
        raise StreamTableError(f"corrupt StreamTable snapshot: fields {schema.names}, expected {expected}")
    return meta, specs
