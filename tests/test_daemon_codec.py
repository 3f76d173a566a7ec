"""Decoding input messages: every accepted shape against hand-written expectations, and
every rejection with its reason."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.codec import EVENT_OFFSET_SHIFT, Decoder, Format, encode_events, message_offset


def _decode(features, values, keys=None, fmt=None):
    keys = keys if keys is not None else [None] * len(values)
    return Decoder(features, fmt).decode(values, keys, list(range(100, 100 + len(values))))


def test_decode_single_events_gives_arrays_and_event_offsets():
    b = _decode(["value"], [b'{"stream": "a", "ts": 1000, "value": 1.5}', b'{"stream": "b", "ts": 2000, "value": 3}'])
    assert b.stream_ids == ["a", "b"]
    assert b.timestamps.tolist() == [1000, 2000]
    assert b.values.tolist() == [[1.5], [3.0]]
    assert b.offsets.tolist() == [100 << EVENT_OFFSET_SHIFT, 101 << EVENT_OFFSET_SHIFT]
    assert message_offset(b.offsets[1]) == 101 and b.messages_ok == 2 and not b.rejected


def test_decode_multivariate_named_fields_values_object_and_list_agree():
    msgs = [b'{"stream": "a", "ts": 1, "cpu": 0.5, "mem": 0.25}',
            b'{"stream": "a", "ts": 2, "values": {"mem": 0.25, "cpu": 0.5}}',
            b'{"stream": "a", "ts": 3, "values": [0.5, 0.25]}']
    b = _decode(["cpu", "mem"], msgs)
    assert b.values.tolist() == [[0.5, 0.25]] * 3


def test_decode_array_message_numbers_events_within_the_message():
    arr = json.dumps([{"stream": "a", "ts": 1, "value": 1.0}, {"stream": "a", "ts": 2, "value": None},
                      {"stream": "a", "ts": 3, "value": 3.0}]).encode()
    b = _decode(["value"], [arr])
    assert b.offsets.tolist() == [(100 << EVENT_OFFSET_SHIFT) + i for i in range(3)]
    assert b.values[0, 0] == 1.0 and np.isnan(b.values[1, 0]) and b.values[2, 0] == 3.0


def test_decode_arrow_batch_equals_json_of_same_events():
    ids, ts, x = ["a", "b", "a"], np.array([1, 2, 3]), np.array([[1.0, 2.0], [3.0, 4.0], [5.0, np.nan]])
    arrow = _decode(["cpu", "mem"], [encode_events(ids, ts, x, ["cpu", "mem"], arrow=True)])
    js = _decode(["cpu", "mem"], [encode_events(ids, ts, x, ["cpu", "mem"])])
    assert arrow.stream_ids == js.stream_ids == ids
    np.testing.assert_array_equal(arrow.values, js.values)
    np.testing.assert_array_equal(arrow.timestamps, ts)


def test_decode_arrow_timestamp_column_is_epoch_ms():
    t = pa.table({"stream": ["a"], "ts": pa.array([1_767_225_600_000], pa.timestamp("ms", tz="UTC")), "value": [2.0]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    b = _decode(["value"], [sink.getvalue().to_pybytes()])
    assert b.timestamps.tolist() == [1_767_225_600_000]


def test_stream_id_falls_back_to_message_key():
    b = _decode(["value"], [b'{"ts": 1, "value": 2.0}'], keys=[b"from-key"])
    assert b.stream_ids == ["from-key"]


def test_configured_field_names_are_used():
    fmt = Format(stream="id", ts="time", value="v", values="vals")
    b = _decode(["v"], [b'{"id": "x", "time": 7, "v": 1.0}'], fmt=fmt)
    assert (b.stream_ids, b.timestamps.tolist(), b.values.tolist()) == (["x"], [7], [[1.0]])


@pytest.mark.parametrize("value, reason", [
    (b"{nope", "invalid JSON"),
    (b'{"stream": "a", "ts": "noon", "value": 1}', "invalid event"),
    (b'{"stream": "a", "value": 1}', "invalid event"),
    (b'{"stream": "a", "ts": 1}', "no value"),
    (b'{"stream": "a", "ts": 1, "value": "high"}', "invalid event"),
    (b'{"ts": 1, "value": 1.0}', "no key"),
    (b"[]", "empty JSON array"),
    (b"", "empty message"),
    (None, "empty message"),
    (b"\xff\xff\xff\xffgarbage", "invalid Arrow"),
    (b'"just a string"', "invalid event"),
    # Not JSON alone, but valid inside the batch's joined array: must not become two events
    # that shift the later messages' offsets.
    (b'{"stream": "a", "ts": 1, "value": 1.0},{"stream": "b", "ts": 1, "value": 2.0}', "invalid JSON"),
    (b'{"stream": "a", "ts": 1, "value": 1.0},', "invalid JSON"),
    (b'{"stream": "a", "ts": 18446744073709551615, "value": 1.0}', "invalid event"),  # beyond int64
])
def test_bad_message_is_rejected_with_reason_and_others_survive(value, reason):
    good = b'{"stream": "a", "ts": 1, "value": 1.0}'
    b = _decode(["value"], [good, value, good])
    assert [r.index for r in b.rejected] == [1]
    assert reason in b.rejected[0].reason
    assert b.stream_ids == ["a", "a"] and b.messages_ok == 2
    assert b.offsets.tolist() == [100 << EVENT_OFFSET_SHIFT, 102 << EVENT_OFFSET_SHIFT]


def test_values_list_of_wrong_length_and_missing_arrow_column_are_rejected():
    b = _decode(["cpu", "mem"], [b'{"stream": "a", "ts": 1, "values": [1.0]}',
                                 encode_events(["a"], [1], [[1.0]], ["cpu"], arrow=True)])
    assert "has 1 values" in b.rejected[0].reason
    assert "lacks column" in b.rejected[1].reason


def test_one_bad_event_rejects_its_whole_array_message():
    arr = json.dumps([{"stream": "a", "ts": 1, "value": 1.0}, {"stream": "a", "ts": 2}]).encode()
    b = _decode(["value"], [arr, b'{"stream": "b", "ts": 1, "value": 1.0}'])
    assert [r.index for r in b.rejected] == [0] and b.stream_ids == ["b"]


_EVENT = st.fixed_dictionaries({"stream": st.sampled_from(["a", "b", "é"]), "ts": st.integers(0, 10**13),
                                "value": st.one_of(st.none(), st.floats(-1e6, 1e6))})
_VALID = st.one_of(_EVENT.map(lambda e: json.dumps(e).encode()),
                   st.lists(_EVENT, min_size=1, max_size=3).map(lambda es: json.dumps(es).encode()))
_ARROW = st.lists(_EVENT, min_size=1, max_size=3).map(
    lambda es: encode_events([e["stream"] for e in es], [e["ts"] for e in es],
                             [[math.nan if e["value"] is None else e["value"]] for e in es], ["value"], arrow=True))
_MESSAGE = st.one_of(
    _VALID,
    _ARROW,
    st.lists(_VALID, min_size=2, max_size=3).map(b",".join),  # valid only inside a joined array
    st.binary(max_size=12),
    st.none(),
    st.sampled_from([b"[]", b"{}", b"null", b"1", b'"s"', b"[{}]", b"\xff\xff\xff\xff"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_MESSAGE, min_size=1, max_size=8))
def test_batch_decode_equals_decoding_each_message_alone(messages):
    """Whatever a batch holds, its decode is the concatenation of each message decoded on its
    own: a bad message can change nothing about the others (their events, offsets, order)."""
    dec = Decoder(["value"])
    offsets = list(range(500, 500 + len(messages)))
    whole = dec.decode(messages, [None] * len(messages), offsets)
    ids, ts, vals, offs, rejected, ok = [], [], [], [], [], 0
    for i, m in enumerate(messages):
        one = dec.decode([m], [None], [offsets[i]])
        ids += one.stream_ids
        ts += one.timestamps.tolist()
        vals += one.values[:, 0].tolist()
        offs += one.offsets.tolist()
        rejected += [(i, r.reason) for r in one.rejected]
        ok += one.messages_ok
    assert whole.stream_ids == ids and whole.timestamps.tolist() == ts and whole.offsets.tolist() == offs
    np.testing.assert_array_equal(whole.values[:, 0], np.array(vals, np.float64))
    assert [(r.index, r.reason) for r in whole.rejected] == rejected
    assert whole.messages_ok == ok == len(messages) - len(rejected)


def test_stream_ids_the_detector_cannot_hold_are_rejected_not_raised():
    """Ids over the stream table's byte limit (JSON field, message key, Arrow column) and
    empty Arrow ids are the message's fault: dead letters, not a stopped daemon."""
    from streamrnn.kernels.idmap import MAX_ID_BYTES

    long_id = "é" * (MAX_ID_BYTES // 2 + 1)  # 2 utf-8 bytes each
    good = b'{"stream": "a", "ts": 1, "value": 1.0}'
    msgs = [good, json.dumps({"stream": long_id, "ts": 1, "value": 1.0}).encode(),
            b'{"ts": 1, "value": 1.0}', encode_events([long_id], [1], [[1.0]], ["value"], arrow=True),
            encode_events([""], [1], [[1.0]], ["value"], arrow=True), good]
    b = _decode(["value"], msgs, keys=[None, None, long_id.encode(), None, None, None])
    assert [r.index for r in b.rejected] == [1, 2, 3, 4]
    assert all("limit is" in r.reason for r in b.rejected[:3]) and "empty stream id" in b.rejected[3].reason
    assert b.stream_ids == ["a", "a"]
    ok = "é" * (MAX_ID_BYTES // 2)  # exactly at the limit: accepted
    assert _decode(["value"], [json.dumps({"stream": ok, "ts": 1, "value": 1.0}).encode()]).stream_ids == [ok]


def _general_only(features) -> Decoder:
    """A decoder without the one-call path for plain batches (the reference)."""
    dec = Decoder(features)
    dec._plain = None
    return dec


_PLAIN = {"stream": "a", "ts": 1, "value": 1.0}
#: One change to a plain event each: the batch may still be plain, or not any more.
_CHANGES = [{}, {}, {"value": None}, {"stream": "é"}, {"stream": ""}, {"stream": None}, {"stream": ...},
            {"values": [2.5]}, {"values": None},
            {"cpu": "bad"}, {"cpu": 3.0}, {"value": "high"}, {"value": ...}, {"ts": "noon"}, {"other": [1]},
            {"ts": 1767225600}]


def _changed(change: dict) -> bytes:
    e = {**_PLAIN, **change}
    return json.dumps({k: v for k, v in e.items() if v is not ...}).encode()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(range(len(_CHANGES))), min_size=1, max_size=4), st.sampled_from([["value"], ["cpu"]]))
def test_one_call_path_of_plain_batches_equals_the_general_path(changes, features):
    """One-feature batches of plain events take one msgspec call; whatever the events hold
    (nulls, a values field, a feature field of the wrong type, no stream field but a key),
    the result equals the general path's, rejections included."""
    messages = [_changed(_CHANGES[c]) for c in changes]
    keys = [b"k"] * len(messages)
    offsets = list(range(7, 7 + len(messages)))
    got = Decoder(features).decode(messages, keys, offsets)
    want = _general_only(features).decode(messages, keys, offsets)
    assert got.stream_ids == want.stream_ids and got.timestamps.tolist() == want.timestamps.tolist()
    assert got.offsets.tolist() == want.offsets.tolist() and got.values.shape == want.values.shape
    np.testing.assert_array_equal(got.values, want.values)
    assert [(r.index, r.reason) for r in got.rejected] == [(r.index, r.reason) for r in want.rejected]
    assert got.messages_ok == want.messages_ok


def test_plain_batch_takes_the_one_call_path(monkeypatch):
    dec = Decoder(["value"])
    monkeypatch.setattr(dec, "_parse_all", lambda *a: pytest.fail("took the general path"))
    msgs = [b'{"stream": "a", "ts": 1, "value": 1.5}', b'{"stream": "b", "ts": 2, "value": null, "x": 0}']
    b = dec.decode(msgs, [None, None], [3, 4])
    assert b.stream_ids == ["a", "b"] and b.timestamps.tolist() == [1, 2] and b.messages_ok == 2
    np.testing.assert_array_equal(b.values[:, 0], [1.5, np.nan])
    assert b.offsets.tolist() == [3 << EVENT_OFFSET_SHIFT, 4 << EVENT_OFFSET_SHIFT]


def test_long_ids_in_an_otherwise_plain_batch():
    """Where the one-call path stops trusting an id's length (over a quarter of the byte
    limit in code points) the general path decides: an id within the limit is kept, one
    over it rejected."""
    from streamrnn.kernels.idmap import MAX_ID_BYTES

    fits = "x" * (MAX_ID_BYTES // 4 + 1)  # 1 byte per code point
    over = "é" * (MAX_ID_BYTES // 2 + 1)  # 2 bytes per code point
    good = b'{"stream": "a", "ts": 1, "value": 1.0}'
    b = _decode(["value"], [good, json.dumps({"stream": fits, "ts": 2, "value": 2.0}).encode(),
                            json.dumps({"stream": over, "ts": 3, "value": 3.0}, ensure_ascii=False).encode()])
    assert b.stream_ids == ["a", fits] and b.timestamps.tolist() == [1, 2]
    assert [r.index for r in b.rejected] == [2] and "limit is" in b.rejected[0].reason


def test_epoch_second_timestamps_are_dead_lettered_with_the_reason():
    """Times in epoch seconds read as milliseconds are a day in January 1970: the message goes
    to the dead letters saying so (JSON, JSON array, Arrow), the batch's other messages are
    decoded as usual; small or millisecond times stay accepted."""
    secs = 1767225600
    good = b'{"stream": "a", "ts": 1767225600000, "value": 1.0}'
    messages = [good, json.dumps({"stream": "b", "ts": secs, "value": 2.0}).encode(),
                json.dumps([{"stream": "c", "ts": 5, "value": 1.0}, {"stream": "c", "ts": secs, "value": 1.0}]).encode(),
                encode_events(["d"], [secs], [[1.0]], ["value"], arrow=True),
                b'{"stream": "e", "ts": 999999999, "value": 3.0}']
    b = _decode(["value"], messages)
    assert [r.index for r in b.rejected] == [1, 2, 3]
    assert all("looks like epoch seconds" in r.reason and str(secs) in r.reason for r in b.rejected)
    assert b.stream_ids == ["a", "e"] and b.timestamps.tolist() == [1767225600000, 999999999]
    assert b.messages_ok == 2


def test_decode_for_a_time_delta_model_needs_no_dt_and_ignores_one_given():
    # The detector derives a --time-delta model's dt: events carry the other features only;
    # an event from a producer that still sends dt has it ignored, wherever it is.
    dec = Decoder(["cpu", "mem"], derived=["dt"])
    t0 = 1_767_225_600_000
    msgs = [json.dumps({"stream": "a", "ts": t0, "cpu": 0.5, "mem": 0.25}).encode(),
            json.dumps({"stream": "a", "ts": t0 + 1, "cpu": 0.5, "mem": 0.25, "dt": 7.0}).encode(),
            json.dumps({"stream": "a", "ts": t0 + 2, "values": {"mem": 0.25, "cpu": 0.5, "dt": 7.0}}).encode(),
            json.dumps({"stream": "a", "ts": t0 + 3, "values": [0.5, 0.25]}).encode(),
            json.dumps({"stream": "a", "ts": t0 + 4, "values": [0.5, 0.25, 7.0]}).encode(),
            json.dumps([{"stream": "a", "ts": t0 + 5, "cpu": 0.5, "mem": 0.25}]).encode(),
            encode_events(["a"], [t0 + 6], [[0.5, 0.25]], ["cpu", "mem"], arrow=True),
            encode_events(["a"], [t0 + 7], [[0.5, 0.25, 7.0]], ["cpu", "mem", "dt"], arrow=True),
            json.dumps({"stream": "a", "ts": t0 + 8, "values": [0.5, 0.25, 7.0, 1.0]}).encode()]
    b = dec.decode(msgs, [None] * len(msgs), list(range(len(msgs))))
    assert b.values.tolist() == [[0.5, 0.25]] * 8 and b.timestamps.tolist() == [t0 + i for i in range(8)]
    assert [(r.index, r.reason) for r in b.rejected] == [(8, "event 0: 'values' has 4 values; the model takes 2 (cpu, mem)")]
    # Without derived features a list of three is refused as before.
    plain = Decoder(["cpu", "mem"]).decode(msgs[4:5], [None], [0])
    assert plain.rejected and "has 3 values" in plain.rejected[0].reason
