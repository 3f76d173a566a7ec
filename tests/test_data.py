"""streamrnn.data against real pyarrow files and independent NumPy references."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from streamrnn.data import (DataError, EventBatch, History, Schema, WindowSampler, fit_scaler,
                            iter_events, iter_history, load_history, open_source, split_by_time,
                            stream_counts)
from streamrnn.errors import StreamrnnError

T0 = 1_767_225_600_000  # 2026-01-01 in epoch ms


def write(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


NAMES = ["s10", "s2", "S1", "é-host", "zeta", "Ω", "a b", "a", "ab"] + [f"h{i:03d}" for i in range(31)]


def events_table(n: int = 300, streams: int = 40, seed: int = 0, ts_type: str = "int") -> pa.Table:
    """Events with timestamp ties across streams, exact duplicates and missing values."""
    rng = np.random.default_rng(seed)
    sid = rng.integers(0, streams, n)
    ts = T0 + 1000 * rng.integers(0, n // 3, n)  # many equal timestamps
    v = np.round(rng.normal(size=n), 1)
    w = rng.integers(0, 3, n).astype(np.float64)  # rows tying on (stream, ts, v) differ here
    v[rng.random(n) < 0.05] = np.nan
    dup = rng.choice(n, n // 10, replace=False)  # exact duplicates of random rows
    sid, ts, v, w = (np.concatenate([a, a[dup]]) for a in (sid, ts, v, w))
    perm = rng.permutation(len(ts))
    cols = {"stream": pa.array([NAMES[i] for i in sid[perm]]),
            "ts": pa.array(ts[perm], pa.timestamp("ms", tz="UTC") if ts_type == "timestamp" else pa.int64()),
            "v": pa.array(v[perm], from_pandas=True), "w": pa.array(w[perm])}
    return pa.table(cols)


def reference_replay(table: pa.Table) -> tuple[tuple[list, np.ndarray, np.ndarray], int, int]:
    """Naive reference: Python sort by (ts, stream, values with NaN last); exact duplicates
    removed; rows of a stream sharing a ts merged into their mean over finite values.
    Returns (events, duplicates dropped, rows merged away)."""
    ids = table.column("stream").to_pylist()
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    vals = np.column_stack([table.column(c).to_numpy(zero_copy_only=False).astype(float) for c in ("v", "w")])
    key = lambda r: (int(r[1]), r[0], *[(1, 0.0) if np.isnan(x) else (0, float(x)) for x in r[2]])
    rows = sorted(zip(ids, ts, vals), key=key)
    unique = []
    for r in rows:
        if not unique or key(unique[-1]) != key(r):
            unique.append(r)
    groups: dict[tuple, list] = {}
    for sid, t, v in unique:
        groups.setdefault((int(t), sid), []).append(v)
    out = []
    for (t, sid), vs in groups.items():
        if len(vs) == 1:
            out.append((sid, t, vs[0]))
            continue
        cols = [[x for x in col if np.isfinite(x)] for col in zip(*vs)]
        out.append((sid, t, np.array([sum(c) / len(c) if c else np.nan for c in cols])))
    events = ([r[0] for r in out], np.array([r[1] for r in out]), np.array([r[2] for r in out]))
    return events, len(rows) - len(unique), len(unique) - len(out)


def reference_events(table: pa.Table) -> tuple[list, np.ndarray, np.ndarray]:
    return reference_replay(table)[0]


def collect(batches) -> tuple[list, np.ndarray, np.ndarray]:
    batches = list(batches)
    assert all(isinstance(b, EventBatch) for b in batches)
    ids = [s for b in batches for s in b.stream_ids]
    return ids, np.concatenate([b.ts for b in batches]), np.concatenate([b.values for b in batches])


def assert_same_events(a, b) -> None:
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])  # NaN == NaN in assert_array_equal


# --------------------------------------------------------------------------- reading


def test_parquet_file_storage_order_and_auto_features(tmp_path):
    table = pa.table({"stream": ["a", "b", "a"], "host": ["x", "y", "z"], "ts": [3, 1, 2],
                      "v": [1.5, None, -2.0], "n": pa.array([1, 2, 3], pa.int32())})
    src = open_source(write(tmp_path / "m.parquet", table))
    assert src.features == ["v", "n"]  # the text column "host" is not a feature
    assert src.n_rows == 3 and src.schema == Schema()
    (batch,) = list(src.iter_batches())
    assert list(batch.stream_ids) == ["a", "b", "a"] and batch.stream_ids.dtype == object
    assert batch.ts.dtype == np.int64 and list(batch.ts) == [3, 1, 2]
    np.testing.assert_array_equal(batch.values, [[1.5, 1], [np.nan, 2], [-2.0, 3]])
    assert [len(b) for b in src.iter_batches(batch_rows=2)] == [2, 1]


def test_directory_hive_partitions_and_csv(tmp_path):
    # Hive layout: the stream id is a partition key; "day" is a partition key, not a feature.
    for s in ("a", "b"):
        for day in (1, 2):
            t = pa.table({"ts": [T0 + day * 10 + 1, T0 + day * 10 + 2], "v": [day * 1.0, day * 2.0]})
            write(tmp_path / "hive" / f"stream={s}" / f"day={day}" / "part-0.parquet", t)
    (tmp_path / "hive" / "_SUCCESS").write_text("")
    src = open_source(tmp_path / "hive")
    assert src.features == ["v"] and src.n_rows == 8
    ids, ts, vals = collect(src.iter_batches())
    assert ids == ["a"] * 4 + ["b"] * 4
    # pyarrow's own hive reader sees the same rows.
    ref = ds.dataset(tmp_path / "hive", partitioning="hive").to_table().to_pandas()
    got = sorted(zip(ids, ts.tolist(), vals[:, 0].tolist()))
    want = sorted(zip(ref["stream"].astype(str), ref["ts"].tolist(), ref["v"].tolist()))
    assert got == want

    # CSV, plain and gzip, stream ids that look like numbers stay text.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "one.csv").write_text("stream,ts,v\n007,5,1.5\n007,6,\n")
    (tmp_path / "c" / "two.csv.gz").write_bytes(gzip.compress(b"stream,ts,v\n8,7,2\n"))
    ids, ts, vals = collect(open_source(tmp_path / "c").iter_batches())
    assert ids == ["007", "007", "8"] and list(ts) == [5, 6, 7]
    np.testing.assert_array_equal(vals[:, 0], [1.5, np.nan, 2.0])


def test_timestamp_and_epoch_ms_give_the_same(tmp_path):
    ms = T0 + np.array([0, 1, 1500, 86_400_000])
    a = write(tmp_path / "a" / "x.parquet", pa.table({"stream": ["s"] * 4, "ts": ms, "v": [1.0, 2, 3, 4]}))
    b = write(tmp_path / "b" / "x.parquet", pa.table({"stream": ["s"] * 4, "ts": pa.array(ms, pa.timestamp("ms", tz="UTC")),
                                                      "v": [1.0, 2, 3, 4]}))
    c = write(tmp_path / "c" / "x.parquet", pa.table({"stream": ["s"] * 4, "ts": pa.array(ms * 1000, pa.timestamp("us")),
                                                      "v": [1.0, 2, 3, 4]}))
    (tmp_path / "d").mkdir()
    d = tmp_path / "d" / "x.csv"  # ISO text in CSV is read as a (UTC) timestamp
    d.write_text("stream,ts,v\ns,2026-01-01 00:00:00,1\ns,2026-01-01 00:00:00.001,2\n"
                 "s,2026-01-01 00:00:01.500,3\ns,2026-01-02 00:00:00,4\n")
    outs = [collect(iter_events(open_source(p))) for p in (a, b, c, d)]
    for other in outs[1:]:
        assert_same_events(outs[0], other)
    assert list(outs[0][1]) == list(ms)


def test_single_stream_files(tmp_path):
    write(tmp_path / "cpu.parquet", pa.table({"ts": [1, 2], "v": [1.0, 2.0]}))
    write(tmp_path / "mem.parquet", pa.table({"ts": [1, 3], "v": [5.0, 6.0]}))
    h = load_history(open_source(tmp_path))
    assert h.streams == ["cpu", "mem"]
    h2 = load_history(open_source(tmp_path / "cpu.parquet", Schema(stream_id="host-1")))
    assert h2.streams == ["host-1"]


# --------------------------------------------------------------------------- user mistakes


def _bad(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, pa.Table):
        write(p, content)
    else:
        p.write_bytes(content)
    return p


@pytest.mark.parametrize("case, kwargs, message", [
    ("zero_byte_parquet", {}, "cannot read"),
    ("zero_row_parquet", {}, "no rows"),
    ("empty_csv", {}, "cannot read"),
    ("header_only_csv", {}, "no rows"),
    ("no_time_column", {}, "time column 'ts' not found"),
    ("missing_feature", {"schema": Schema(features=("v", "nope"))}, "feature column 'nope' not found"),
    ("missing_named_stream", {"schema": Schema(stream_col="host")}, "stream column 'host' not found"),
    ("text_feature", {"schema": Schema(features=("v", "name"))}, "feature column 'name' is string, not numeric"),
    ("float_time", {}, "time column 'ts' is double"),
    ("text_time", {}, "time column 'ts' is string"),
    ("no_feature", {}, "no numeric feature column"),
    ("mixed_types", {}, "column 'v' is numeric in"),
])
def test_bad_input_gives_one_clear_error(tmp_path, case, kwargs, message):
    tables = {
        "zero_row_parquet": pa.table({"stream": pa.array([], pa.string()), "ts": pa.array([], pa.int64()),
                                      "v": pa.array([], pa.float64())}),
        "no_time_column": pa.table({"stream": ["a"], "time": [1], "v": [1.0]}),
        "missing_feature": pa.table({"stream": ["a"], "ts": [1], "v": [1.0]}),
        "missing_named_stream": pa.table({"stream": ["a"], "ts": [1], "v": [1.0]}),
        "text_feature": pa.table({"stream": ["a"], "ts": [1], "v": [1.0], "name": ["x"]}),
        "float_time": pa.table({"stream": ["a"], "ts": [1.5], "v": [1.0]}),
        "text_time": pa.table({"stream": ["a"], "ts": ["2026-01-01 00:00"], "v": [1.0]}),
        "no_feature": pa.table({"stream": ["a"], "ts": [1], "name": ["x"]}),
    }
    if case in tables:
        path = _bad(tmp_path, f"{case}.parquet", tables[case])
    elif case == "mixed_types":
        write(tmp_path / "d" / "1.parquet", pa.table({"stream": ["a"], "ts": [1], "v": [1.0]}))
        write(tmp_path / "d" / "2.parquet", pa.table({"stream": ["a"], "ts": [2], "v": ["high"]}))
        path = tmp_path / "d"
    else:
        content = {"zero_byte_parquet": b"", "empty_csv": b"", "header_only_csv": b"stream,ts,v\n"}[case]
        path = _bad(tmp_path, case + (".parquet" if "parquet" in case else ".csv"), content)
    with pytest.raises(DataError) as err:
        open_source(path, **kwargs)
    assert isinstance(err.value, StreamrnnError)
    assert message in str(err.value)
    if case not in ("mixed_types",):
        assert str(path) in str(err.value)  # the message names the file


def test_more_mistakes(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_source(tmp_path / "absent.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Parquet or CSV files"):
        open_source(tmp_path / "empty")
    p = write(tmp_path / "x.parquet", pa.table({"stream": ["a", "b"], "ts": [1, 2], "v": [1.0, 2.0],
                                                "u": pa.array([None, None], pa.float64())}))
    with pytest.raises(DataError, match="feature 'u' has no value"):
        load_history(open_source(p))
    with pytest.raises(DataError, match="missing-value policy"):
        load_history(open_source(p, Schema(features=("v",))), missing="mean")
    p2 = write(tmp_path / "n.parquet", pa.table({"stream": ["a", None], "ts": [1, 2], "v": [1.0, 2.0]}))
    with pytest.raises(DataError, match=r"stream column 'stream' is empty or null in 1 row \(row 2, counting"):
        list(open_source(p2).iter_batches())
    write(tmp_path / "mix" / "1.parquet", pa.table({"stream": ["a"], "ts": [1], "v": [1.0]}))
    write(tmp_path / "mix" / "2.parquet", pa.table({"ts": [1], "v": [1.0]}))
    with pytest.raises(DataError, match="stream column 'stream' is in"):
        open_source(tmp_path / "mix")


def test_rows_without_a_stream_id_are_named_whatever_the_batch_or_format(tmp_path):
    n = 3000
    ids = [f"s{i % 7}" for i in range(n)]
    blank_rows = [10, 1500, 1501, 2999, 2000, 2001, 2002]  # 1-based rows 11, 1501, 1502, 2000, ...
    for i in blank_rows[:4]:
        ids[i] = ""
    for i in blank_rows[4:]:
        ids[i] = None
    table = pa.table({"stream": pa.array(ids, pa.string()), "ts": np.arange(n), "v": np.ones(n)})
    import pyarrow.csv as pacsv
    write(tmp_path / "p" / "x.parquet", table)
    (tmp_path / "c").mkdir()
    pacsv.write_csv(table, tmp_path / "c" / "x.csv")
    for d, where in (("p", r"rows 11, 1501, 1502, 2001, 2002, ..., counting data rows from 1"),
                     ("c", r"lines 12, 1502, 1503, 2002, 2003, ...")):  # CSV: the header is line 1
        src = open_source(tmp_path / d)
        msg = rf"stream column 'stream' is empty or null in 7 rows \({where}\)"
        for read in (lambda: list(iter_events(src, batch_rows=100)), lambda: load_history(src),
                     lambda: list(iter_history(src, max_rows=500)), lambda: stream_counts(src),
                     lambda: load_history(src, streams=["s1"])):  # a filtered read sees the other rows too
            with pytest.raises(DataError, match=msg):
                read()
    # a Parquet dictionary that holds "" which no row of the batch uses is no error
    dict_ids = pa.DictionaryArray.from_arrays(pa.array([0, 0, 1], pa.int32()), pa.array(["a", "b", ""]))
    write(tmp_path / "dict.parquet", pa.table({"stream": dict_ids, "ts": [1, 2, 3], "v": [1.0, 2.0, 3.0]}))
    assert load_history(open_source(tmp_path / "dict.parquet")).streams == ["a", "b"]
    write(tmp_path / "hive" / "stream=" / "x.parquet", pa.table({"ts": [1, 2], "v": [1.0, 2.0]}))
    with pytest.raises(DataError, match=r"partition key stream=\) is empty"):
        load_history(open_source(tmp_path / "hive"))
    with pytest.raises(DataError, match="stream id for files without a stream column is empty"):
        Schema(stream_id="")


def flip_bytes_in_last_data_page(path, column: str) -> None:
    """Invert 4 bytes inside the payload of the last page of ``column``'s first chunk."""
    meta = pq.ParquetFile(path).metadata
    chunk = meta.row_group(0).column(meta.schema.names.index(column))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    at = start + chunk.total_compressed_size - 20  # the chunk ends with a data page's payload
    raw = bytearray(path.read_bytes())
    raw[at:at + 4] = bytes(b ^ 0xFF for b in raw[at:at + 4])
    path.write_bytes(bytes(raw))


def test_a_damaged_parquet_page_is_an_error_naming_the_file(tmp_path):
    from streamrnn.data import read_parquet, write_parquet

    n = 5000
    table = pa.table({"stream": ["a"] * n, "ts": np.arange(n), "v": np.arange(n, dtype=np.float64)})
    path = tmp_path / "x.parquet"
    write_parquet(table, path, compression="none")
    flip_bytes_in_last_data_page(path, "v")
    # unverified, the damage reads as wrong numbers
    assert not np.array_equal(pq.read_table(path).column("v").to_numpy(), np.arange(n))
    msg = r"x.parquet is damaged: a Parquet page fails its checksum"
    for read in (lambda: list(iter_events(open_source(path))), lambda: load_history(open_source(path)),
                 lambda: read_parquet(path)):
        with pytest.raises(DataError, match=msg):
            read()


# --------------------------------------------------------------------------- global order for replay


def test_iter_events_equals_reference_whatever_the_split(tmp_path):
    table = events_table(n=600, seed=1)
    want, n_dup, n_merged = reference_replay(table)
    n = table.num_rows
    assert n_dup and n_merged  # the input has both kinds

    layouts = {
        "one_file": [table],
        # time-sorted files, split by stream: the streaming k-way merge path
        "by_stream": [table.filter(pc.is_in(table.column("stream"), pa.array(NAMES[k::5]))).sort_by("ts")
                      for k in range(5)],
        # time-sorted files split at arbitrary rows of the globally time-sorted table
        "time_chunks": [table.sort_by("ts").slice(a, b - a) for a, b in ((0, 97), (97, 350), (350, n))],
        # unsorted random pieces (each sorted in memory)
        "random_rows": [table.slice(0, 200), table.slice(200, 7), table.slice(207, n - 207)],
    }
    for name, parts in layouts.items():
        d = tmp_path / name
        for i, part in enumerate(parts):
            write(d / f"part{i}.parquet", part)
        for batch_rows in (1, 64, 1000):
            it = iter_events(open_source(d), batch_rows=batch_rows)
            batches = list(it)
            assert [len(b) for b in batches[:-1]] == [batch_rows] * (len(batches) - 1), name
            assert_same_events(collect(batches), want)
            assert (it.stats["duplicates_dropped"], it.stats["conflicts_merged"]) == (n_dup, n_merged)
            assert it.stats["events"] == len(want[0])
        if name in ("by_stream", "time_chunks"):
            assert it.stats["unsorted_files"] == []


def test_iter_events_memory_is_bounded_for_time_sorted_files(tmp_path):
    n_files, rows, batch_rows = 3, 5000, 100
    for k in range(n_files):
        ts = T0 + np.sort(np.random.default_rng(k).integers(0, 10 * rows, rows))
        write(tmp_path / f"f{k}.parquet", pa.table({"stream": [f"s{k}"] * rows, "ts": ts, "v": np.ones(rows)}))
    it = iter_events(open_source(tmp_path), batch_rows=batch_rows)
    assert sum(len(b) for b in it) == n_files * rows - it.stats["duplicates_dropped"]
    # about one batch per file, never the whole input
    assert 0 < it.stats["max_buffered_rows"] <= (n_files + 1) * batch_rows


def test_many_streams_and_extreme_timestamps(tmp_path):
    rng = np.random.default_rng(3)
    n = 4000
    ids = [f"id{i}" for i in rng.integers(0, 1500, n)]  # more ids than the interner's first block
    ts = rng.choice(np.array([-(2 ** 61), 0, 1, 2 ** 61]), n)  # (ts, stream) no longer packs in int64
    v = rng.integers(0, 2, n).astype(np.float64)
    table = pa.table({"stream": ids, "ts": ts, "v": v, "w": np.zeros(n)})
    src = open_source(write(tmp_path / "x.parquet", table))
    assert_same_events(collect(iter_events(src, batch_rows=500)), reference_events(table))
    h = load_history(src)
    assert h.streams == sorted(set(ids))
    assert all(np.all(np.diff(t) > 0) for t in h.ts)


def test_numeric_partition_key_as_feature_and_infinite_values(tmp_path):
    for site in (1, 2):
        write(tmp_path / f"site={site}" / "x.parquet",
              pa.table({"ts": [1, 2, 3], "v": [1.0, np.inf, 3.0]}))
    src = open_source(tmp_path, Schema(features=("v", "site"), stream_id="all"))
    h = load_history(src, missing="drop")
    # both files are the one stream "all"; rows at equal ts from the two sites differ in "site"
    # and are merged into their mean; inf counts as missing
    assert h.streams == ["all"] and h.stats["nonfinite_values"] == 2
    np.testing.assert_array_equal(h.ts[0], [1, 3])
    np.testing.assert_array_equal(h.values[0], [[1.0, 1.5], [3.0, 1.5]])
    with pytest.raises(DataError, match="partition key site='x' is not a number"):
        write(tmp_path / "site=x" / "y.parquet", pa.table({"ts": [1], "v": [1.0]}))
        list(open_source(tmp_path, Schema(features=("v", "site"), stream_id="all")).iter_batches())


def test_iter_events_csv_equals_parquet(tmp_path):
    table = events_table(n=120, seed=2)
    write(tmp_path / "p" / "x.parquet", table)
    (tmp_path / "c").mkdir()
    import pyarrow.csv as pacsv
    pacsv.write_csv(table, tmp_path / "c" / "x.csv")
    assert_same_events(collect(iter_events(open_source(tmp_path / "p"))),
                       collect(iter_events(open_source(tmp_path / "c"))))


# --------------------------------------------------------------------------- history


def test_load_history_sorts_dedups_and_fills(tmp_path):
    nan = np.nan
    t = pa.table({
        "stream": ["a", "a", "a", "a", "a", "a", "b", "b", "b"],
        "ts":     [5,   1,   3,   3,   2,   4,   2,   1,   2],
        "v":      [5.0, nan, 3.0, 3.0, 2.0, nan, 7.0, 6.0, 9.0],
        "w":      [50., 10., 30., 30., nan, 40., 70., 60., 70.],
    }, schema=pa.schema([("stream", pa.string()), ("ts", pa.int64()), ("v", pa.float64()), ("w", pa.float64())]))
    t = t.set_column(2, "v", pa.array(t.column("v").to_numpy(), from_pandas=True))
    src = open_source(write(tmp_path / "h.parquet", t))

    h = load_history(src, missing="ffill")
    assert h.streams == ["a", "b"] and h.features == ["v", "w"]
    # a: ts 1 has no v yet -> leading row dropped; ts 2 w filled from ts 1; ts 3 duplicate dropped.
    np.testing.assert_array_equal(h.ts[0], [2, 3, 4, 5])
    np.testing.assert_array_equal(h.values[0], [[2, 10], [3, 30], [3, 40], [5, 50]])
    # b: two rows at ts 2 with different values are merged into their mean.
    np.testing.assert_array_equal(h.ts[1], [1, 2])
    np.testing.assert_array_equal(h.values[1], [[6, 60], [8, 70]])
    st = h.stats
    assert (st["rows_read"], st["duplicates_dropped"], st["conflicts_merged"]) == (9, 1, 1)
    assert (st["rows_dropped_missing"], st["missing_filled"]) == (1, 2)
    assert (st["time_min"], st["time_max"], st["rows"]) == (1, 5, 6)

    hd = load_history(src, missing="drop")
    np.testing.assert_array_equal(hd.ts[0], [3, 5])
    hz = load_history(src, missing="zero")
    np.testing.assert_array_equal(hz.values[0], [[0, 10], [2, 0], [3, 30], [0, 40], [5, 50]])


def test_gaps_split_segments_and_time_delta(tmp_path):
    ts = [0, 1000, 2500, 60_000, 61_000, 200_000]
    src = open_source(write(tmp_path / "g.parquet", pa.table({"stream": ["a"] * 6, "ts": ts,
                                                              "v": [1.0, 2, 3, 4, 5, 6]})))
    h = load_history(src, max_gap_ms=10_000, time_delta_feature=True)
    assert h.streams == ["a", "a", "a"] and h.features == ["v", "dt"]
    assert [list(t) for t in h.ts] == [[0, 1000, 2500], [60_000, 61_000], [200_000]]
    np.testing.assert_array_equal(h.values[0][:, 1], [0.0, 1.0, 1.5])
    np.testing.assert_array_equal(h.values[1][:, 1], [0.0, 1.0])
    assert h.stats["gaps_split"] == 2 and h.stats["segments"] == 3 and h.stats["streams"] == 1


# --------------------------------------------------------------------------- split and scaler


def _history_file(path: Path, seed: int, streams=("a", "b", "c"), n=100, alter_after=None) -> Path:
    rng, wild = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    rows = []
    for k, s in enumerate(streams):
        ts = T0 + 1000 * np.arange(n) + k
        v = rng.normal(loc=10 * k, scale=1 + k, size=(n, 2))
        v[rng.random(n) < 0.05, 0] = np.nan
        if alter_after is not None:
            late = ts >= alter_after[s]
            v[late] = wild.normal(1000, 50, size=(late.sum(), 2))
        rows.append(pa.table({"stream": [s] * n, "ts": ts, "v": v[:, 0], "w": v[:, 1]}))
    t = pa.concat_tables(rows)
    t = t.set_column(2, "v", pa.array(t.column("v").to_numpy(zero_copy_only=False), from_pandas=True))
    return write(path, t)


def test_split_has_no_leakage(tmp_path):
    h = load_history(open_source(_history_file(tmp_path / "orig.parquet", 3)))
    sp = split_by_time(h, valid=0.2, calib=0.1)
    for s in ("a", "b", "c"):
        (tr,) = [t for sid, t in zip(sp.train.streams, sp.train.ts) if sid == s]
        (va,) = [t for sid, t in zip(sp.valid.streams, sp.valid.ts) if sid == s]
        (ca,) = [t for sid, t in zip(sp.calib.streams, sp.calib.ts) if sid == s]
        assert (len(tr), len(va), len(ca)) == (70, 20, 10)
        assert tr[-1] < sp.cutoffs["valid"][s] == va[0] and va[-1] < sp.cutoffs["calib"][s] == ca[0]

    # Everything from the validation cut on replaced by wild values: train part and scaler unchanged.
    altered = _history_file(tmp_path / "alt.parquet", 3, alter_after=sp.cutoffs["valid"])
    sp2 = split_by_time(load_history(open_source(altered)), valid=0.2, calib=0.1)
    assert sp2.cutoffs == sp.cutoffs
    for a, b in zip(sp.train.values + sp.train.ts, sp2.train.values + sp2.train.ts):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(sp.valid.values[0], sp2.valid.values[0])
    for kind in ("zscore", "robust"):
        s1, s2 = fit_scaler(sp.train, kind, per_stream=True), fit_scaler(sp2.train, kind, per_stream=True)
        np.testing.assert_array_equal(s1.mean, s2.mean)
        np.testing.assert_array_equal(s1.stream_scale, s2.stream_scale)


def test_scaler_against_numpy(tmp_path):
    h = load_history(open_source(_history_file(tmp_path / "s.parquet", 4)))
    x = np.concatenate(h.values)
    g = fit_scaler(h, "zscore")
    np.testing.assert_allclose(g.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(g.scale, x.std(axis=0), rtol=1e-12)
    r = fit_scaler(h, "robust")
    q1, q3 = np.percentile(x, 25, axis=0), np.percentile(x, 75, axis=0)
    np.testing.assert_allclose(r.mean, np.median(x, axis=0), rtol=1e-12)
    np.testing.assert_allclose(r.scale, (q3 - q1) / 1.349, rtol=1e-12)

    ps = fit_scaler(h, "zscore", per_stream=True)
    assert ps.stream_ids == ["a", "b", "c"]
    for i, s in enumerate(ps.stream_ids):
        xs = h.values[h.streams.index(s)]
        np.testing.assert_allclose(ps.stream_mean[i], xs.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(ps.stream_scale[i], xs.std(axis=0), rtol=1e-12)
        np.testing.assert_allclose(ps.transform(s, xs), (xs - xs.mean(axis=0)) / xs.std(axis=0), rtol=1e-9)
    # unseen stream -> global statistics; per-row ids; inverse; apply
    row = np.array([[1.0, 2.0]])
    np.testing.assert_allclose(ps.transform("zz", row), (row - ps.mean) / ps.scale)
    ids = ["c", "zz", "a"]
    rows = np.arange(6.0).reshape(3, 2)
    one_by_one = np.vstack([ps.transform(s, r[None]) for s, r in zip(ids, rows)])
    np.testing.assert_allclose(ps.transform(ids, rows), one_by_one)
    np.testing.assert_allclose(ps.inverse_transform(ids, ps.transform(ids, rows)), rows)
    applied = ps.apply(h)
    for v in applied.values:
        np.testing.assert_allclose(v.mean(axis=0), 0, atol=1e-12)
    fields = ps.model_fields()
    assert fields["stream_scaler"]["streams"] == ["a", "b", "c"]

    # a constant feature is centred, not divided by zero
    const = History(["k"], [np.arange(3)], [np.array([[5.0, 1], [5.0, 2], [5.0, 3]])], ["v", "w"])
    c = fit_scaler(const, "robust", per_stream=True)
    assert c.scale[0] == 1.0 and c.stream_scale[0, 0] == 1.0 and c.mean[0] == 5.0


# --------------------------------------------------------------------------- windows


def _all_windows(x: np.ndarray, window: int, stride: int) -> np.ndarray:
    return np.stack([x[t:t + window + 1] for t in range(0, len(x) - window, stride)])


def test_window_sampler_keeps_everything_below_capacity():
    rng = np.random.default_rng(0)
    seqs = {"a": rng.normal(size=(40, 2)), "b": rng.normal(size=(3, 2)), "c": rng.normal(size=(25, 2))}
    ws = WindowSampler(window=5, stride=3, capacity=1000, seed=1)
    for s, x in seqs.items():
        ws.add(s, x)
    want = np.concatenate([_all_windows(x, 5, 3) for x in seqs.values() if len(x) > 5]).astype(np.float32)
    got = ws.windows()
    assert got.shape == want.shape == (len(want), 6, 2) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert ws.short_sequences == ["b"]


def test_window_sampler_bounded_reproducible_and_uniform():
    x = np.arange(2000, dtype=np.float64)[:, None]
    cands = _all_windows(x, 4, 1).astype(np.float32)  # 1996 candidate windows

    def run(seed, chunk):
        ws = WindowSampler(window=4, stride=1, capacity=50, seed=seed)
        for i, start in enumerate(range(0, len(x), chunk)):
            ws.add("s", x[start:start + chunk], continues=i > 0)
        return ws

    a, b = run(7, 2000), run(7, 2000)
    wa = a.windows()
    assert wa.shape == (50, 5, 1) and a.n_seen == len(cands)
    np.testing.assert_array_equal(wa, b.windows())
    assert not np.array_equal(wa, run(8, 2000).windows())
    # every kept window is a real window of the data
    assert all(np.array_equal(w[:, 0], np.arange(w[0, 0], w[0, 0] + 5)) for w in wa)
    # feeding the stream in chunks offers exactly the same candidates
    chunked = run(7, 333)
    assert chunked.n_seen == len(cands)
    np.testing.assert_array_equal(chunked.windows(), wa)
    # inclusion probability is capacity / n for early and late windows alike (algorithm R)
    starts = np.concatenate([run(seed, 2000).windows()[:, 0, 0] for seed in range(200)])
    early, late = np.mean(starts < 998), np.mean(starts >= 998)
    assert abs(early - 0.5) < 0.03 and abs(late - 0.5) < 0.03


# --------------------------------------------------------------------------- history in parts


def test_iter_history_parts_equal_the_full_load(tmp_path):
    path = _history_file(tmp_path / "p.parquet", 5, streams=("a", "b", "c", "d", "e"), n=60)
    src = open_source(path)
    full = load_history(src, max_gap_ms=10_000, time_delta_feature=True)
    parts = list(iter_history(src, max_rows=130, max_gap_ms=10_000, time_delta_feature=True))
    assert [p.streams for p in parts] == [["a", "b"], ["c", "d"], ["e"]]
    assert stream_counts(src) == {s: 60 for s in "abcde"}
    assert sum((p.streams for p in parts), []) == full.streams
    for got, want in zip(sum((p.values for p in parts), []) + sum((p.ts for p in parts), []),
                         full.values + full.ts):
        np.testing.assert_array_equal(got, want)
    # one stream larger than max_rows is a part of its own
    assert [p.streams for p in iter_history(src, max_rows=10)] == [[s] for s in "abcde"]

    # one file per stream (ids from file stems), and integer stream ids: the same parts
    for k, s in enumerate("abcde"):
        t = pa.table({"ts": T0 + np.arange(30), "v": np.arange(30.0) * (k + 1)})
        write(tmp_path / "per_file" / f"{s}.parquet", t)
        write(tmp_path / "int_ids" / f"{s}.parquet", t.append_column("stream", pa.array([k] * 30)))
    for layout in ("per_file", "int_ids"):
        src = open_source(tmp_path / layout)
        full = load_history(src)
        parts = list(iter_history(src, max_rows=70))
        assert [len(p.streams) for p in parts] == [2, 2, 1]
        assert sum((p.streams for p in parts), []) == full.streams
        for got, want in zip(sum((p.values for p in parts), []), full.values):
            np.testing.assert_array_equal(got, want)

    bad = write(tmp_path / "nan.parquet", pa.table({"stream": ["a", "b"], "ts": [1, 2], "v": [1.0, 2.0],
                                                    "u": pa.array([None, None], pa.float64())}))
    with pytest.raises(DataError, match="feature 'u' has no value"):
        list(iter_history(open_source(bad), max_rows=1))


def test_scaler_fitted_on_parts(tmp_path, monkeypatch):
    import streamrnn.data as data

    src = open_source(_history_file(tmp_path / "p.parquet", 6, streams=("a", "b", "c", "d"), n=80))
    full = split_by_time(load_history(src)).train

    def train_parts():
        return (split_by_time(h).train for h in iter_history(src, max_rows=100))

    for kind in ("zscore", "robust"):
        want, got = fit_scaler(full, kind, per_stream=True), fit_scaler(train_parts(), kind, per_stream=True)
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12)
        np.testing.assert_allclose(got.scale, want.scale, rtol=1e-12)
        assert got.stream_ids == want.stream_ids
        np.testing.assert_array_equal(got.stream_mean, want.stream_mean)
        np.testing.assert_array_equal(got.stream_scale, want.stream_scale)
    # the global robust statistics from a bounded sample stay close to the exact ones
    monkeypatch.setattr(data, "ROBUST_SAMPLE_ROWS", 100)
    sampled = fit_scaler(train_parts(), "robust")
    exact = fit_scaler(full, "robust")
    assert not np.array_equal(sampled.mean, exact.mean)
    x = np.concatenate(full.values)
    lo, hi = np.percentile(x, 35, axis=0), np.percentile(x, 65, axis=0)
    assert np.all((lo <= sampled.mean) & (sampled.mean <= hi))
    np.testing.assert_allclose(sampled.scale, exact.scale, rtol=0.5)
