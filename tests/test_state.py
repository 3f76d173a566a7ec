"""StreamTable against a naive reference: a Python dict of rows plus LRU bookkeeping."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict

import numpy as np
import psutil
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit

import streamrnn.state
from streamrnn.kernels import idmap
from streamrnn.state import Assignment, Column, StreamTable, StreamTableError

# A float32 NaN with a payload, to check that values survive bit for bit.
NAN_PAYLOAD = np.array([0x7FC0BEEF], np.uint32).view(np.float32)[0]


def make_columns():
    return {
        "state": Column((3,), np.float32, 0.5),
        "count": Column((), np.int32, 0),
        "pred": Column((1,), np.float32, NAN_PAYLOAD),
        "grid": Column((2, 2), np.float64, -1.0),
        "flag": Column((), np.bool_, False),
    }


def event_value(stream_id: str, i: int) -> np.ndarray:
    """A deterministic per-event input written to the state column (a stand-in model)."""
    return np.array([len(stream_id), i % 7, 1.0], np.float32)


class Reference:
    """Obviously correct model: rows in a dict, recency in an OrderedDict."""

    def __init__(self, columns, max_streams=None, idle_timeout_ms=None):
        self.columns = columns
        self.max_streams = max_streams
        self.idle_timeout_ms = idle_timeout_ms
        self.rows: dict[str, dict] = {}
        self.lru: OrderedDict[str, int] = OrderedDict()  # id -> number of its last assign call
        self.calls = 0
        self.watermark = None
        self.evictions = 0

    def fresh_row(self):
        row = {name: spec.fill.copy() for name, spec in self.columns.items()}
        row["last_offset"] = np.int64(-1)
        return row

    def distinct_new(self, ids):
        return list(OrderedDict.fromkeys(s for s in ids if s not in self.rows))

    def assign(self, ids, ts, evicted):
        """Apply one assign call given the evicted ids the table chose; check the choice."""
        call = self.calls + 1
        new_ids = self.distinct_new(ids)
        in_batch = set(ids)
        excess = 0 if self.max_streams is None else len(self.rows) + len(new_ids) - self.max_streams
        assert len(evicted) == max(0, excess), (evicted, excess)
        assert len(set(evicted)) == len(evicted)
        assert not set(evicted) & in_batch, "evicted a stream of the current batch"
        assert set(evicted) <= set(self.rows)
        survivors = [s for s in self.rows if s not in in_batch and s not in set(evicted)]
        if evicted and survivors:  # least recently used first: nothing older survives
            assert max(self.lru[s] for s in evicted) <= min(self.lru[s] for s in survivors)
        for s in evicted:
            del self.rows[s], self.lru[s]
        self.evictions += len(evicted)
        for s in new_ids:
            self.rows[s] = self.fresh_row()
            if ts is None:  # None = the wall clock at the call, filled in by run_ops
                self.rows[s]["last_seen"] = self.watermark
            else:
                self.rows[s]["last_seen"] = np.iinfo(np.int64).min
        for i, s in enumerate(ids):
            row = self.rows[s]
            row["state"] = row["state"] + event_value(s, i)
            row["count"] = row["count"] + 1
            row["flag"] = np.bool_(True)
            if ts is not None:
                row["last_seen"] = max(row["last_seen"], int(ts[i]))
            self.lru[s] = call
            self.lru.move_to_end(s)
        if ts is not None and len(ids):
            self.watermark = max(int(max(ts)), self.watermark if self.watermark is not None else int(max(ts)))
        self.calls = call
        return new_ids

    def remove(self, ids):
        gone = [s for s in dict.fromkeys(ids) if s in self.rows]
        for s in gone:
            del self.rows[s], self.lru[s]
        return len(gone)

    def evict_idle(self, now):
        idle = [s for s, row in self.rows.items() if row["last_seen"] < now - self.idle_timeout_ms]
        for s in idle:
            del self.rows[s], self.lru[s]
        self.evictions += len(idle)
        return idle


def apply_model(table: StreamTable, a: Assignment, ids) -> None:
    """What the detector would do with the slots: update each event's stream row."""
    vals = np.stack([event_value(s, i) for i, s in enumerate(ids)]) if len(ids) else np.zeros((0, 3), np.float32)
    np.add.at(table.column("state"), a.slots, vals)
    np.add.at(table.column("count"), a.slots, 1)
    table.column("flag")[a.slots] = True


def check_same(table: StreamTable, ref: Reference) -> None:
    assert len(table) == len(ref.rows)
    assert sorted(table.ids()) == sorted(ref.rows)
    assert table.evictions == ref.evictions
    slots = set()
    for s, row in ref.rows.items():
        assert s in table
        slot = table.slot_of(s)
        assert slot is not None and table.id_of(slot) == s
        slots.add(slot)
        for name, want in row.items():
            got = table.column(name)[slot]
            assert np.asarray(got).tobytes() == np.asarray(want, table.columns[name].dtype).tobytes(), (s, name, got, want)
        assert table.column("touch")[slot] == ref.lru[s]
    assert len(slots) == len(ref.rows), "two streams share a slot"


def run_ops(table: StreamTable, ref: Reference, ops) -> None:
    for op in ops:
        kind = op[0]
        before = int(time.time() * 1000)
        if kind == "assign":
            _, ids, ts = op
            distinct = len(set(ids))
            if ref.max_streams is not None and distinct > ref.max_streams:
                with pytest.raises(StreamTableError, match="max_streams"):
                    table.assign(ids, ts)
                check_same(table, ref)  # a failed call leaves the table unchanged
                continue
            was_known = {s for s in ids if s in ref.rows}
            a = table.assign(ids, ts)
            new_ids = ref.assign(ids, ts, a.evicted)
            assert a.slots.dtype == np.int64 and a.slots.shape == (len(ids),)
            assert a.new.dtype == np.bool_ and a.new.shape == (len(ids),)
            seen = set()
            want_new = []
            for s in ids:
                want_new.append(s not in was_known and s not in seen)
                seen.add(s)
            assert a.new.tolist() == want_new
            assert sorted(new_ids) == sorted(s for s, n in zip(ids, want_new) if n)
            for s, slot in zip(ids, a.slots.tolist()):
                assert table.slot_of(s) == slot
            after = int(time.time() * 1000)
            for s in new_ids:
                if ref.rows[s]["last_seen"] is None:  # no timestamps seen yet: the wall clock
                    got = int(table.column("last_seen")[table.slot_of(s)])
                    assert before <= got <= after
                    ref.rows[s]["last_seen"] = got
            apply_model(table, a, ids)
        elif kind == "remove":
            assert table.remove(op[1]) == ref.remove(op[1])
        elif kind == "idle":
            assert sorted(table.evict_idle(op[1])) == sorted(ref.evict_idle(op[1]))
        check_same(table, ref)


# ------------------------------------------------------------------ property tests

ID_POOL = [
    "a", "ab", "abc", "abcd", "b", "host-1", "host-10", "host-100", "host-1/cpu",
    "é", "e\u0301", "日本", "日本語", "🙂", "🙂🙂", "a" * 40, "a" * 41, " ", "\x00", "Ω/Ω",
]
ids_strategy = st.one_of(
    st.sampled_from(ID_POOL),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=6),
)
batch_strategy = st.lists(ids_strategy, min_size=0, max_size=12)
op_strategy = st.one_of(
    st.tuples(st.just("assign"), batch_strategy, st.booleans()),
    st.tuples(st.just("remove"), st.lists(ids_strategy, max_size=4)),
    st.tuples(st.just("idle"), st.integers(0, 60)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(op_strategy, min_size=1, max_size=25),
    max_streams=st.one_of(st.none(), st.integers(1, 8)),
    capacity=st.integers(1, 4),
)
def test_assign_random_ops_matches_reference(ops, max_streams, capacity):
    columns = make_columns()
    table = StreamTable(columns, max_streams=max_streams, idle_timeout_ms=10, capacity=capacity)
    ref = Reference(columns, max_streams=max_streams, idle_timeout_ms=10)
    concrete = []
    clock = 0
    for op in ops:
        if op[0] == "assign":
            clock += 3
            ts = [clock + (i % 5) for i in range(len(op[1]))] if op[2] else None
            concrete.append(("assign", op[1], ts))
        else:
            concrete.append(op)
    run_ops(table, ref, concrete)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assign_fixed_seed_churn_matches_reference(seed):
    rng = np.random.default_rng(seed)
    universe = [f"s{i}-{'x' * int(rng.integers(0, 12))}é" if i % 3 else f"host-{i:05d}/cpu" for i in range(3000)]
    columns = make_columns()
    table = StreamTable(columns, max_streams=700, idle_timeout_ms=50, capacity=1)
    ref = Reference(columns, max_streams=700, idle_timeout_ms=50)
    ops = []
    for step in range(40):
        hot = rng.integers(0, 1 + step * 75, 300)  # a growing population, with repeats
        ops.append(("assign", [universe[i] for i in hot], (step * 10 + rng.integers(0, 10, 300)).tolist()))
        if step % 7 == 3:
            ops.append(("remove", [universe[i] for i in rng.integers(0, 3000, 200)]))
        if step % 11 == 5:
            ops.append(("idle", step * 10))
    run_ops(table, ref, ops)
    assert table.evictions > 0


# ------------------------------------------------------------------ index behaviour


def test_assign_many_resizes_finds_every_id():
    table = StreamTable({"x": Column((), np.int64, 7)}, capacity=1)
    ids = [f"k{i}" for i in range(60_000)]
    slots = []
    for lo in range(0, len(ids), 10_000):  # batches past the parallel-lookup threshold
        a = table.assign(ids[lo : lo + 10_000])
        assert a.new.all()
        slots.append(a.slots)
    slots = np.concatenate(slots)
    assert len(np.unique(slots)) == len(ids)
    again = table.assign(ids[::-1])
    assert not again.new.any()
    np.testing.assert_array_equal(again.slots, slots[::-1])
    assert table.capacity >= len(ids)
    assert table.slot_of("k60000") is None and "k6000" in table
    assert [table.slot_of(s) for s in ids[:3000]] == slots[:3000].tolist()  # serial == parallel


def test_lookup_unknown_minus_one_without_side_effects():
    table = StreamTable({}, max_streams=2)
    table.assign(["a", "b"], [1, 2])
    touch = table.column("touch")[:2].copy()
    got = table.lookup(["b", "nope", "a", "b"])
    assert got.tolist() == [table.slot_of("b"), -1, table.slot_of("a"), table.slot_of("b")]
    assert len(table) == 2 and "nope" not in table
    np.testing.assert_array_equal(table.column("touch")[:2], touch)


def test_assign_prefix_sharing_ids_distinct_slots():
    ids = ["a" * n for n in range(1, 200)] + ["ab" * n for n in range(1, 100)] + ["a\x00", "a\x00\x00"]
    table = StreamTable({})
    a = table.assign(ids)
    assert len(set(a.slots.tolist())) == len(ids)
    assert [table.id_of(int(s)) for s in a.slots] == ids


@njit
def _tags(data, offsets, out):
    for i in range(out.shape[0]):
        out[i] = idmap.hash_bytes(data, offsets[i], offsets[i + 1]) & np.uint64(0xFFFFFFFF)


def test_lookup_tag_collision_distinct_slots():
    # Find ids whose 32-bit tags (the part of the hash kept in the table) collide, so the
    # probe meets an entry with the right tag but the wrong id.
    candidates = pa.array([f"c{i:06d}" for i in range(300_000)])
    data = np.frombuffer(candidates.buffers()[2], np.uint8)
    offsets = np.frombuffer(candidates.buffers()[1], np.int32, count=len(candidates) + 1)
    tags = np.empty(len(candidates), np.uint64)
    _tags(data, offsets, tags)
    order = np.argsort(tags, kind="stable")
    dup = np.flatnonzero(np.diff(tags[order]) == 0)
    assert dup.size, "no 32-bit tag collision among 300k ids"
    pairs = [(candidates[int(order[d])].as_py(), candidates[int(order[d + 1])].as_py()) for d in dup]
    table = StreamTable({})
    for x, y in pairs:
        sx = table.assign([x]).slots[0]
        sy = table.assign([y]).slots[0]
        assert sx != sy
        assert table.slot_of(x) == sx and table.slot_of(y) == sy
    for x, y in pairs:
        assert table.remove([x]) == 1
        assert table.slot_of(x) is None and table.slot_of(y) is not None


def test_assign_reused_slot_resets_columns_to_fill():
    table = StreamTable(make_columns(), max_streams=2)
    a = table.assign(["a"], [1])
    a = Assignment(np.concatenate([a.slots, table.assign(["b"], [1]).slots]), a.new, [])
    table.column("state")[a.slots] = 9.0
    table.column("grid")[a.slots] = 9.0
    table.column("last_offset")[a.slots] = 42
    b = table.assign(["c"], [2])
    assert b.evicted == ["a"] and b.new.tolist() == [True]
    assert b.slots[0] == a.slots[0]  # the freed slot is reused
    slot = b.slots[0]
    np.testing.assert_array_equal(table.column("state")[slot], [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(table.column("grid")[slot], -np.ones((2, 2)))
    assert table.column("pred")[slot].view(np.uint32)[0] == 0x7FC0BEEF
    assert table.column("last_offset")[slot] == -1 and table.column("last_seen")[slot] == 2
    assert table.remove(["c", "zz"]) == 1
    d = table.assign(["d"])
    assert d.slots[0] == slot and table.column("state")[slot].tolist() == [0.5] * 3


def test_remove_churn_keeps_index_memory_bounded():
    table = StreamTable({"x": Column((), np.int8, 0)}, capacity=1)
    sizes = []
    for r in range(60):
        ids = [f"round{r}-stream-{i}-{'y' * (i % 9)}" for i in range(2_000)]
        table.assign(ids)
        assert table.remove(ids) == len(ids)
        sizes.append(table.index_nbytes)
    assert len(table) == 0
    assert sizes[-1] <= 2 * sizes[2], "freed ids' bytes are not reclaimed"
    table.assign(["survivor"])
    assert table.ids() == ["survivor"]


def test_init_large_capacity_not_resident():
    proc = psutil.Process()
    before = proc.memory_info().rss
    table = StreamTable({"h": Column((64,), np.float32, 0.0)}, capacity=2_000_000)  # 512 MB virtual
    grown = proc.memory_info().rss - before
    assert table.capacity == 2_000_000
    assert grown < 32 << 20, f"{grown} bytes resident for an empty table"


# ------------------------------------------------------------------ inputs and errors


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda ids: ids, id="list"),
        pytest.param(tuple, id="tuple"),
        pytest.param(lambda ids: (s for s in ids), id="generator"),
        pytest.param(lambda ids: np.array(ids), id="numpy-str"),
        pytest.param(lambda ids: np.array(ids, dtype=object), id="numpy-object"),
        pytest.param(lambda ids: pa.array(ids, pa.string()), id="arrow-string"),
        pytest.param(lambda ids: pa.array(ids, pa.large_string()), id="arrow-large-string"),
        pytest.param(lambda ids: pa.array(["pad", "pad2"] + ids, pa.string()).slice(2), id="arrow-sliced"),
        pytest.param(lambda ids: pa.chunked_array([ids[:2], ids[2:]], pa.string()), id="arrow-chunked"),
        pytest.param(lambda ids: pa.array(ids, pa.string_view()), id="arrow-string-view"),
    ],
)
def test_assign_input_kinds_same_slots(convert):
    ids = ["b", "a", "日本", "b", "🙂x"]
    want = StreamTable({}).assign(ids)
    got = StreamTable({}).assign(convert(ids))
    np.testing.assert_array_equal(got.slots, want.slots)
    np.testing.assert_array_equal(got.new, want.new)


@pytest.mark.parametrize(
    "ids, named",
    [
        ([5], "5"),
        (["ok", None], "None"),
        (["ok", b"raw"], "b'raw'"),
        (["ok", ""], "''"),
        (["ok", 1.5], "1.5"),
        (["ok", "\ud800"], "'\\ud800'"),
        (np.array([1, 2]), "int64"),
        ("single-id", "single-id"),
        (pa.array([b"x"], pa.binary()), "b'x'"),
    ],
)
def test_assign_bad_id_raises_naming_value(ids, named):
    table = StreamTable({})
    with pytest.raises(StreamTableError) as err:
        table.assign(ids)
    assert named in str(err.value)
    assert isinstance(err.value, ValueError)
    assert len(table) == 0


def test_assign_batch_over_max_streams_raises_and_keeps_table():
    table = StreamTable({"x": Column((), np.int64, 0)}, max_streams=3)
    table.assign(["a", "b", "c"], [5, 5, 5])
    touch = table.column("touch")[:3].copy()
    with pytest.raises(StreamTableError, match=r"4 distinct streams but max_streams=3; raise max_streams"):
        table.assign(["a", "x", "y", "z", "a"], [9] * 5)
    assert sorted(table.ids()) == ["a", "b", "c"] and table.evictions == 0
    np.testing.assert_array_equal(table.column("touch")[:3], touch)
    assert table.column("last_seen")[table.slot_of("a")] == 5
    a = table.assign(["x", "y", "a"])  # exactly max_streams distinct: evicts b and c
    assert sorted(a.evicted) == ["b", "c"]


def test_assign_lru_evicts_least_recent_call_not_timestamp():
    table = StreamTable({}, max_streams=3)
    table.assign(["old-ts"], [10_000])  # call 1, newest event time
    table.assign(["b", "c"], [1, 1])  # call 2
    table.assign(["old-ts"], [1])  # call 3: old-ts is now the most recently used
    a = table.assign(["d"], [2])
    assert a.evicted in (["b"], ["c"])
    assert "old-ts" in table and table.column("touch")[table.slot_of("old-ts")] == 3


def test_evict_idle_without_timeout_raises():
    with pytest.raises(StreamTableError, match="idle_timeout_ms"):
        StreamTable({}).evict_idle(0)


def test_evict_idle_old_streams_removed_and_counted():
    table = StreamTable({}, idle_timeout_ms=100)
    table.assign(["a", "b", "c"], [1000, 1050, 1100])
    assert table.evict_idle(1120) == ["a"]
    assert sorted(table.evict_idle(1300)) == ["b", "c"]
    assert table.evictions == 3 and len(table) == 0


def test_assign_without_timestamps_new_streams_start_at_watermark():
    table = StreamTable({}, idle_timeout_ms=10)
    before = int(time.time() * 1000)
    table.assign(["wall"])
    assert before <= table.column("last_seen")[table.slot_of("wall")] <= int(time.time() * 1000)
    table.assign(["a"], [5_000])
    table.assign(["a", "b"])  # no timestamps: a keeps 5000, b starts at the watermark
    assert table.column("last_seen")[table.slot_of("a")] == 5_000
    assert table.column("last_seen")[table.slot_of("b")] == 5_000


@pytest.mark.parametrize(
    "timestamps, match",
    [([1, 2], "one value per event"), ([1.5, 2.0, 3.0], "integers"), (["x", "y", "z"], "integers")],
)
def test_assign_bad_timestamps_raises(timestamps, match):
    with pytest.raises(StreamTableError, match=match):
        StreamTable({}).assign(["a", "b", "c"], timestamps)


def test_assign_datetime_timestamps_become_epoch_ms():
    table = StreamTable({})
    table.assign(["a"], np.array(["1970-01-01T00:00:01.5"], "datetime64[ms]"))
    assert table.column("last_seen")[0] == 1500


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: StreamTable({"touch": Column((), np.int64, 0)}), "reserved"),
        (lambda: StreamTable({"x": (3,)}), "must be a Column"),
        (lambda: StreamTable({}, max_streams=0), "max_streams must be >= 1"),
        (lambda: Column((2,), np.complex64, 0), "dtype"),
        (lambda: Column((2,), object, 0), "dtype"),
        (lambda: Column((0,), np.float32, 0), "positive"),
        (lambda: Column((), np.uint8, -1), "does not fit"),
        (lambda: StreamTable({}).column("nope"), "no column 'nope'"),
        (lambda: StreamTable({}).id_of(0), "slot 0 holds no stream"),
    ],
)
def test_constructor_bad_arguments_raise(make, match):
    with pytest.raises(StreamTableError, match=match):
        make()


def test_contains_non_str_false():
    table = StreamTable({})
    table.assign(["5"])
    assert "5" in table and 5 not in table and None not in table and "" not in table


def test_state_nbytes_per_stream_counts_all_columns():
    table = StreamTable({"state": Column((32,), np.float32, 0), "pred": Column((1,), np.float32, 0)})
    assert table.state_nbytes_per_stream == 32 * 4 + 4 + 3 * 8
    assert table.column("state").shape == (table.capacity, 32)


def test_docstring_examples_run():
    result = doctest.testmod(streamrnn.state, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ snapshots


def table_rows(table: StreamTable) -> dict[str, dict[str, bytes]]:
    """id -> column name -> raw bytes of its value (bit-exact comparison)."""
    return {
        s: {name: np.ascontiguousarray(table.column(name)[table.slot_of(s)]).tobytes() for name in table.columns}
        for s in table.ids()
    }


def test_snapshot_restore_same_process_bit_exact():
    table = StreamTable(make_columns(), max_streams=50, idle_timeout_ms=7)
    a = table.assign(["x", "日本", "x", "🙂"], [3, 4, 5, 6])
    apply_model(table, a, ["x", "日本", "x", "🙂"])
    table.column("pred")[a.slots[1]] = np.array([0x7FA00001], np.uint32).view(np.float32)  # signalling NaN
    table.column("grid")[a.slots[0]] = [[-0.0, np.inf], [np.nan, 1e-310]]
    table.column("last_offset")[a.slots[0]] = 123
    restored = StreamTable.restore(table.snapshot())
    assert table_rows(restored) == table_rows(table)
    assert restored.columns == table.columns
    assert restored.max_streams == 50 and restored.idle_timeout_ms == 7
    assert StreamTable.restore(table.snapshot(), max_streams=None).max_streams is None


def test_snapshot_empty_table_round_trips():
    restored = StreamTable.restore(StreamTable({"x": Column((2,), np.int16, 3)}).snapshot())
    assert len(restored) == 0 and restored.columns["x"] == Column((2,), np.int16, 3)
    assert restored.assign(["a"]).new.tolist() == [True]


def test_restore_more_streams_than_max_raises():
    table = StreamTable({})
    table.assign(["a", "b", "c"])
    with pytest.raises(StreamTableError, match="max_streams>=3"):
        StreamTable.restore(table.snapshot(), max_streams=2)


# Operations after the snapshot, done by this process and by a fresh one on the restored
# table (more come first, see the test).
FURTHER_OPS = [
    ("assign", [f"n{i}" for i in range(30)], list(range(100, 130))),
    ("remove", ["s3", "s5", "n4"]),
    ("assign", ["s1", "s2", "n1", "日本"], [140, 141, 142, 143]),
    ("assign", [f"late{i}" for i in range(25)] + ["s1"], [150] * 26),
    ("idle", 145),
    ("assign", ["s7", "🙂", "s7"], [160, 161, 162]),
]

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from streamrnn.state import StreamTable
    snap, ops, out = sys.argv[1:4]
    table = StreamTable.restore(open(snap, "rb").read())
    log = []
    for op in json.load(open(ops)):
        if op[0] == "assign":
            a = table.assign(op[1], op[2])
            table.column("state")[a.slots] += np.float32(0.25)
            log.append({"events": a.slots.size, "new": a.new.tolist(), "evicted": a.evicted})
        elif op[0] == "remove":
            log.append(table.remove(op[1]))
        else:
            log.append(sorted(table.evict_idle(op[1])))
    open(out, "wb").write(table.snapshot())
    print(json.dumps(log))
    """
)


def run_further(table: StreamTable, ops) -> list:
    log = []
    for op in ops:
        if op[0] == "assign":
            a = table.assign(op[1], op[2])
            table.column("state")[a.slots] += np.float32(0.25)
            log.append({"events": a.slots.size, "new": a.new.tolist(), "evicted": a.evicted})
        elif op[0] == "remove":
            log.append(table.remove(op[1]))
        else:
            log.append(sorted(table.evict_idle(op[1])))
    return log


def test_snapshot_restore_other_process_continues_identically(tmp_path):
    table = StreamTable(make_columns(), max_streams=60, idle_timeout_ms=20)
    rng = np.random.default_rng(5)
    for step in range(6):
        ids = [f"s{i}" for i in rng.integers(0, 40, 50)] + ["日本", "🙂"]
        a = table.assign(ids, (step * 10 + rng.integers(0, 5, len(ids))).tolist())
        apply_model(table, a, ids)
    table.remove(["s0", "s9"])
    table.assign([f"evict-me{i}" for i in range(30)], [70] * 30)  # forces LRU evictions and slot reuse
    table.column("last_offset")[: table.capacity] = np.arange(table.capacity)
    live = table.ids()
    table.remove(live[::5])  # free slots: new streams reuse them here, not after restore
    (tmp_path / "snap").write_bytes(table.snapshot())
    # Ties in the LRU order that eviction must break the same way although the two
    # tables gave the tied streams different slots: ten streams first seen in one call,
    # every other stream touched after them, then five new streams evict half of them.
    others = [s for i, s in enumerate(live) if i % 5]
    ops = [
        ("assign", [f"tie{i}" for i in range(10)], [80] * 10),
        ("assign", others, [81] * len(others)),
        ("assign", [f"five{i}" for i in range(5)], [82] * 5),
        *FURTHER_OPS,
    ]
    (tmp_path / "ops.json").write_text(json.dumps(ops))

    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "snap"), str(tmp_path / "ops.json"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )
    assert child.returncode == 0, child.stderr
    child_log = json.loads(child.stdout.strip().splitlines()[-1])

    here_log = run_further(table, ops)
    assert here_log == child_log
    tied = here_log[2]["evicted"]
    assert tied and len(tied) < 10 and all(s.startswith("tie") for s in tied)
    assert sorted(tied) != [f"tie{i}" for i in range(len(tied))]  # not simply by arrival
    assert any(isinstance(entry, dict) and entry["evicted"] for entry in here_log), "no LRU eviction exercised"
    theirs = StreamTable.restore((tmp_path / "out").read_bytes())
    assert table_rows(theirs) == table_rows(table)
    assert theirs.evictions == table.evictions
    # The restored-and-continued table keeps working: new streams, LRU eviction.
    a = theirs.assign([f"more{i}" for i in range(70)][:60], [999] * 60)
    assert a.new.all() and len(theirs) == 60


def test_restore_truncated_snapshot_raises_or_is_complete():
    table = StreamTable(make_columns())
    a = table.assign([f"id{i}" for i in range(50)], list(range(50)))
    apply_model(table, a, [f"id{i}" for i in range(50)])
    data = table.snapshot()
    want = table_rows(table)
    raised = 0
    for cut in range(0, len(data), 7):
        try:
            restored = StreamTable.restore(data[:cut])
        except StreamTableError:
            raised += 1
        else:  # only the end-of-stream marker may be missing
            assert cut >= len(data) - 8 and table_rows(restored) == want
    assert raised >= len(range(0, len(data) - 8, 7))


def test_restore_flipped_bytes_raise_or_restore_identically():
    table = StreamTable(make_columns())
    ids = [f"id{i}" for i in range(20)]
    a = table.assign(ids, list(range(20)))
    apply_model(table, a, ids)
    data = table.snapshot()
    want = table_rows(table)
    rng = np.random.default_rng(0)
    raised = 0
    positions = sorted(set(rng.integers(0, len(data), 400).tolist()))
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            restored = StreamTable.restore(bytes(bad))
        except StreamTableError:
            raised += 1
        else:  # a flip in padding or an unused field changes nothing
            assert table_rows(restored) == want
    assert raised > len(positions) // 2


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "not a readable"),
        (b"definitely not arrow", "not a readable"),
        (None, "lacks 'streamrnn.state'"),
    ],
)
def test_restore_not_a_snapshot_raises(data, match):
    if data is None:  # a valid Arrow stream that is not ours
        sink = pa.BufferOutputStream()
        batch = pa.record_batch([pa.array(["a"])], names=["stream_id"])
        with pa.ipc.new_stream(sink, batch.schema) as w:
            w.write_batch(batch)
        data = sink.getvalue().to_pybytes()
    with pytest.raises(StreamTableError, match=match):
        StreamTable.restore(data)


def test_add_column_sets_existing_rows_then_fill_for_new_streams_and_snapshots():
    table = StreamTable({"h": Column((2,), np.float32)})
    table.assign(["a", "b"])
    table.add_column("lo", Column((3,), np.float64, np.inf), existing=-np.inf)
    lo = table.column("lo")
    assert np.all(lo[[table.slot_of("a"), table.slot_of("b")]] == -np.inf)
    table.assign(["c"])
    assert np.all(table.column("lo")[table.slot_of("c")] == np.inf)
    back = StreamTable.restore(table.snapshot())
    np.testing.assert_array_equal(back.column("lo")[back.slot_of("a")], [-np.inf] * 3)
    np.testing.assert_array_equal(back.column("lo")[back.slot_of("c")], [np.inf] * 3)
    with pytest.raises(StreamTableError, match="already exists"):
        table.add_column("lo", Column((), np.float64))
    with pytest.raises(StreamTableError, match="does not fit"):
        table.add_column("n", Column((), np.int8), existing="x")


# ------------------------------------------------------------------ copies


def churned_table() -> StreamTable:
    """A table with LRU evictions, removed streams (free slots) and NaN payloads."""
    table = StreamTable(make_columns(), max_streams=60, idle_timeout_ms=20)
    rng = np.random.default_rng(11)
    for step in range(5):
        ids = [f"s{i}" for i in rng.integers(0, 40, 50)] + ["日本", "🙂"]
        a = table.assign(ids, (step * 10 + rng.integers(0, 5, len(ids))).tolist())
        apply_model(table, a, ids)
    table.assign([f"evict-me{i}" for i in range(30)], [60] * 30)
    table.column("last_offset")[: table.capacity] = np.arange(table.capacity)
    table.remove(table.ids()[::4])
    return table


def test_copy_snapshot_equals_original_snapshot_after_original_changes():
    table = churned_table()
    before = table.snapshot()
    copy = table.copy()
    run_further(table, FURTHER_OPS)
    table.column("state")[:] = 7.0
    assert copy.snapshot() == before
    assert table.snapshot() != before


def test_copy_continues_like_the_original_and_leaves_it_alone():
    table = churned_table()
    copy = table.copy()
    restored = StreamTable.restore(table.snapshot())
    copy_log = run_further(copy, FURTHER_OPS)
    after_copy_changed = table.snapshot()
    assert copy_log == run_further(restored, FURTHER_OPS)
    assert table_rows(copy) == table_rows(restored) and copy.evictions == restored.evictions
    assert run_further(table, FURTHER_OPS) == copy_log
    assert table.snapshot() == copy.snapshot()
    assert StreamTable.restore(after_copy_changed).ids() != copy.ids()  # the copy's changes stayed in the copy
