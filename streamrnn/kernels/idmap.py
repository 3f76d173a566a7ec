"""Open-addressing hash index from stream id (utf-8 bytes) to slot, as Numba kernels.

The index lives in a handful of NumPy arrays owned by ``streamrnn.state.StreamTable``,
so a million streams cost tens of bytes each instead of the ~100+ bytes a Python
``dict[str, int]`` spends on the mapping alone:

``arena``   uint8   the ids' utf-8 bytes, appended one after another.
``id_ref``  int64   per slot: ``start << LEN_BITS | length`` of its id in the arena; 0 = free
                    slot (ids are never empty). One array instead of two saves a cache miss
                    per lookup.
``table``   int64   power-of-2 capacity, linear probing; ``EMPTY`` (-1) or an entry
                    ``tag << 32 | slot`` where ``tag`` is the low 32 bits of the id's hash.
                    The tag rejects most probe collisions without touching the arena, and
                    since the home position is ``tag & mask`` the table can be rebuilt or
                    shifted without re-reading any id.
``meta``    int64   counters the sequential kernels update in place (see ``M_*``).

A match is always confirmed by comparing the full bytes, so two ids never share a slot
whatever their hashes. Deletion uses backward shifting (no tombstones), so probe sequences
stay as short after heavy eviction as in a freshly built table.

Kernels are pure functions over caller-supplied arrays: they never allocate outputs, do
no I/O and hold no Python objects; the caller sizes every array beforehand.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from streamrnn.config import jit_options

_OPTS = jit_options()
_PAR_OPTS = jit_options(parallel=True)

#: Free table position.
EMPTY = np.int64(-1)
#: Bits of ``id_ref`` that hold the id's length: ids up to 16 MiB - 1 bytes, arenas up to
#: 2**39 bytes.
LEN_BITS = 24
MAX_ID_BYTES = (1 << LEN_BITS) - 1
_LEN_MASK = np.int64(MAX_ID_BYTES)
_LOW32 = np.int64(0xFFFFFFFF)

# Layout of the ``meta`` counters array.
M_ARENA_USED = 0  # bytes of the arena in use (live ids and garbage of freed ones)
M_N_FREE = 1  # entries on the free-slot stack
M_HIGH_WATER = 2  # slots ever handed out; slots >= this have never been used
M_LIVE = 3  # live streams (entries in the table)
M_GARBAGE = 4  # arena bytes of freed ids, reclaimed by ``compact_arena``
META_SIZE = 5

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


@njit(inline="always", **_OPTS)
def hash_bytes(data, start, end):
    """64-bit FNV-1a over ``data[start:end]``, then MurmurHash3's fmix64 finaliser.

    FNV-1a alone leaves the low bits (which pick the table position) weakly mixed for ids
    that differ only in their last characters, e.g. ``host-0000001``/``host-0000002``;
    the finaliser spreads every input bit over the whole word.
    """
    h = _FNV_OFFSET
    for i in range(start, end):
        h = (h ^ np.uint64(data[i])) * _FNV_PRIME
    h ^= h >> _S33
    h *= _M1
    h ^= h >> _S33
    h *= _M2
    h ^= h >> _S33
    return h


@njit(inline="always", **_OPTS)
def _tag_of(h):
    return np.int64(h & np.uint64(0xFFFFFFFF))


@njit(inline="always", **_OPTS)
def _same_bytes(a, a0, b, b0, n):
    for k in range(n):
        if a[a0 + k] != b[b0 + k]:
            return False
    return True


@njit(inline="always", **_OPTS)
def _find(table, id_ref, arena, data, start, n, tag):
    """Slot of ``data[start:start+n]`` (hash tag ``tag``) or -1; also the position where
    the probe stopped (an empty position when the id is absent)."""
    mask = table.shape[0] - 1
    pos = tag & mask
    while True:
        entry = table[pos]
        if entry == EMPTY:
            return np.int64(-1), pos
        if ((entry >> 32) & _LOW32) == tag:
            slot = entry & _LOW32
            ref = id_ref[slot]
            if (ref & _LEN_MASK) == n and _same_bytes(arena, ref >> LEN_BITS, data, start, n):
                return slot, pos
        pos = (pos + 1) & mask


#: Events resolved together by ``lookup``: their cache misses overlap (see there).
BLOCK = 64


@njit(**_OPTS)
def _lookup_block(lo, hi, table, id_ref, arena, data, offsets, out_slots, out_tags, scratch):
    """Resolve events ``lo..hi`` (at most ``BLOCK``) stage by stage.

    A lookup is a chain of dependent cache misses (table -> id_ref -> arena). Done one
    event at a time the chains run one or two at a time; here each stage runs over the
    whole block, so the misses of one stage are independent and overlap in flight
    (about 4x faster at a million streams).
    """
    mask = table.shape[0] - 1
    for i in range(lo, hi):
        out_tags[i] = _tag_of(hash_bytes(data, offsets[i], offsets[i + 1]))
    # Gather each id's home entry, then walk on from it (mostly within the same cache
    # line) to the first entry with the same 32-bit tag, which is almost always the id.
    for i in range(lo, hi):
        scratch[i] = table[out_tags[i] & mask]
    for i in range(lo, hi):
        tag = out_tags[i]
        entry = scratch[i]
        pos = tag & mask
        while entry != EMPTY and ((entry >> 32) & _LOW32) != tag:
            pos = (pos + 1) & mask
            entry = table[pos]
        out_slots[i] = -1 if entry == EMPTY else entry & _LOW32
    for i in range(lo, hi):
        scratch[i] = id_ref[max(out_slots[i], 0)]
    # Reading the candidate's first and last byte pulls its arena lines in for the full
    # comparison below (and already rejects most tag collisions). The loads are
    # unconditional (an unknown id reads slot 0's, always in bounds) so that they issue
    # together instead of waiting behind branches.
    for i in range(lo, hi):
        ref = scratch[i]
        a0 = ref >> LEN_BITS
        n_ref = ref & _LEN_MASK
        first = arena[a0]
        last = arena[a0 + max(n_ref - 1, 0)]
        start = offsets[i]
        n_bytes = np.int64(offsets[i + 1] - start)
        if n_ref != n_bytes or first != data[start] or last != data[start + n_bytes - 1]:
            scratch[i] = -1
    for i in range(lo, hi):
        slot = out_slots[i]
        if slot < 0:
            continue
        ref = scratch[i]
        start = offsets[i]
        n_bytes = np.int64(offsets[i + 1] - start)
        if ref < 0 or not _same_bytes(arena, ref >> LEN_BITS, data, start, n_bytes):
            # A 32-bit tag collision: rare, so probe the slow way.
            out_slots[i], _ = _find(table, id_ref, arena, data, start, n_bytes, out_tags[i])


@njit(**_PAR_OPTS)
def lookup(table, id_ref, arena, data, offsets, out_slots, out_tags, scratch):
    """Slot of each id ``data[offsets[i]:offsets[i+1]]`` or -1 when unknown.

    Writes ``out_slots[i]`` and the id's hash tag ``out_tags[i]`` (reused by ``dedupe``
    and ``insert``); ``scratch`` is int64 of the same length. Read-only over the index,
    so blocks of events run in parallel.
    """
    n = out_slots.shape[0]
    for b in prange((n + BLOCK - 1) // BLOCK):
        lo = b * BLOCK
        _lookup_block(lo, min(n, lo + BLOCK), table, id_ref, arena, data, offsets, out_slots, out_tags, scratch)


@njit(**_OPTS)
def lookup_serial(table, id_ref, arena, data, offsets, out_slots, out_tags, scratch):
    """``lookup`` on the calling thread: for small batches, where waking the thread pool
    costs more than the lookups."""
    n = out_slots.shape[0]
    for lo in range(0, n, BLOCK):
        _lookup_block(lo, min(n, lo + BLOCK), table, id_ref, arena, data, offsets, out_slots, out_tags, scratch)


@njit(**_OPTS)
def dedupe(data, offsets, tags, events, scratch, out_first):
    """Group the given events by id: ``out_first[k]`` is the first event among ``events``
    whose id equals that of ``events[k]``. Returns how many distinct ids there are.

    ``scratch`` is a power-of-2 int64 array filled with ``EMPTY``, at least twice as long
    as ``events``; it holds event indices.
    """
    mask = scratch.shape[0] - 1
    distinct = 0
    for k in range(events.shape[0]):
        e = events[k]
        start = offsets[e]
        n = offsets[e + 1] - start
        pos = tags[e] & mask
        while True:
            rep = scratch[pos]
            if rep == EMPTY:
                scratch[pos] = e
                out_first[k] = e
                distinct += 1
                break
            if (
                tags[rep] == tags[e]
                and offsets[rep + 1] - offsets[rep] == n
                and _same_bytes(data, offsets[rep], data, start, n)
            ):
                out_first[k] = rep
                break
            pos = (pos + 1) & mask
    return distinct


@njit(**_OPTS)
def insert(table, id_ref, arena, free, meta, data, offsets, tags, events, first, out_slots):
    """Give every distinct id among ``events`` a slot and enter it in the index.

    ``events``/``first`` come from ``dedupe``; the ids must be absent from the index. A new
    slot is popped from the ``free`` stack, else taken at the high-water mark. Repeated
    events get the slot of their first occurrence. The caller has made room: table load,
    slot capacity (``id_ref``) and arena bytes.
    """
    mask = table.shape[0] - 1
    for k in range(events.shape[0]):
        e = events[k]
        if first[k] != e:
            out_slots[e] = out_slots[first[k]]
            continue
        if meta[M_N_FREE] > 0:
            meta[M_N_FREE] -= 1
            slot = free[meta[M_N_FREE]]
        else:
            slot = meta[M_HIGH_WATER]
            meta[M_HIGH_WATER] += 1
        start = offsets[e]
        n = np.int64(offsets[e + 1] - start)
        at = meta[M_ARENA_USED]
        for j in range(n):
            arena[at + j] = data[start + j]
        meta[M_ARENA_USED] = at + n
        id_ref[slot] = (at << LEN_BITS) | n
        tag = tags[e]
        pos = tag & mask
        while table[pos] != EMPTY:
            pos = (pos + 1) & mask
        table[pos] = (tag << 32) | slot
        meta[M_LIVE] += 1
        out_slots[e] = slot


@njit(**_OPTS)
def _delete_at(table, pos):
    """Empty ``table[pos]`` and shift later members of its cluster back (no tombstones)."""
    mask = table.shape[0] - 1
    hole = pos
    j = pos
    while True:
        j = (j + 1) & mask
        entry = table[j]
        if entry == EMPTY:
            break
        home = ((entry >> 32) & _LOW32) & mask
        # The entry may move into the hole unless its home lies cyclically in (hole, j].
        if (j > hole and (home <= hole or home > j)) or (j < hole and (home <= hole and home > j)):
            table[hole] = entry
            hole = j
    table[hole] = EMPTY


@njit(**_OPTS)
def remove(table, id_ref, arena, free, meta, slots):
    """Forget the streams in ``slots`` (live, distinct): drop them from the index, push
    their slots on the ``free`` stack and count their bytes as arena garbage."""
    for k in range(slots.shape[0]):
        slot = slots[k]
        ref = id_ref[slot]
        start = ref >> LEN_BITS
        n = ref & _LEN_MASK
        tag = _tag_of(hash_bytes(arena, start, start + n))
        found, pos = _find(table, id_ref, arena, arena, start, n, tag)
        if found != slot:  # not reachable for a consistent index
            continue
        _delete_at(table, pos)
        id_ref[slot] = 0
        free[meta[M_N_FREE]] = slot
        meta[M_N_FREE] += 1
        meta[M_LIVE] -= 1
        meta[M_GARBAGE] += n


@njit(**_OPTS)
def rebuild(old_table, new_table):
    """Re-enter every entry of ``old_table`` into ``new_table`` (power of 2, all EMPTY)."""
    mask = new_table.shape[0] - 1
    for i in range(old_table.shape[0]):
        entry = old_table[i]
        if entry == EMPTY:
            continue
        pos = ((entry >> 32) & _LOW32) & mask
        while new_table[pos] != EMPTY:
            pos = (pos + 1) & mask
        new_table[pos] = entry


@njit(**_OPTS)
def compact_arena(old_arena, id_ref, high_water, new_arena, in_place):
    """Copy the live ids of slots ``0..high_water-1`` into ``new_arena`` back to back,
    rewriting ``id_ref``. Returns the bytes used. With ``in_place`` (``new_arena`` is
    ``old_arena``) ids are visited in arena order, so each one only moves down, never onto
    an id not yet copied."""
    n_live = 0
    for s in range(high_water):
        if id_ref[s] != 0:
            n_live += 1
    order = np.empty(n_live, np.int64)
    k = 0
    for s in range(high_water):
        if id_ref[s] != 0:
            order[k] = s
            k += 1
    starts = np.empty(n_live, np.int64)
    for k in range(n_live):
        starts[k] = id_ref[order[k]] >> LEN_BITS
    if in_place:
        order = order[np.argsort(starts, kind="mergesort")]
    at = np.int64(0)
    for k in range(n_live):
        s = order[k]
        ref = id_ref[s]
        start = ref >> LEN_BITS
        n = ref & _LEN_MASK
        for j in range(n):
            new_arena[at + j] = old_arena[start + j]
        id_ref[s] = (at << LEN_BITS) | n
        at += n
    return at


@njit(**_OPTS)
def gather_ids(arena, id_ref, slots, out_data, out_offsets):
    """Write the ids of ``slots`` back to back into ``out_data`` with Arrow-style
    ``out_offsets`` (length ``len(slots) + 1``); size ``out_data`` with ``id_lengths``."""
    at = np.int64(0)
    out_offsets[0] = 0
    for k in range(slots.shape[0]):
        ref = id_ref[slots[k]]
        start = ref >> LEN_BITS
        n = ref & _LEN_MASK
        for j in range(n):
            out_data[at + j] = arena[start + j]
        at += n
        out_offsets[k + 1] = at


@njit(**_OPTS)
def id_lengths(id_ref, slots, out_len):
    """Byte length of each slot's id (0 for a free slot)."""
    for k in range(slots.shape[0]):
        out_len[k] = id_ref[slots[k]] & _LEN_MASK


@njit(**_OPTS)
def id_hashes(id_ref, arena, slots, out_hashes):
    """64-bit hash of each slot's id (a deterministic, slot-independent tie-breaker)."""
    for k in range(slots.shape[0]):
        ref = id_ref[slots[k]]
        start = ref >> LEN_BITS
        out_hashes[k] = hash_bytes(arena, start, start + (ref & _LEN_MASK))


@njit(**_OPTS)
def touch(slots, touch_col, clock, last_seen, timestamps, use_timestamps):
    """Mark each event's stream as used at ``clock`` and, when ``use_timestamps``, raise
    its ``last_seen`` to the event's timestamp. Sequential: a batch repeats slots."""
    for i in range(slots.shape[0]):
        s = slots[i]
        touch_col[s] = clock
        if use_timestamps and timestamps[i] > last_seen[s]:
            last_seen[s] = timestamps[i]
