"""Decoding input messages into event arrays, in batches, with msgspec.

A message value is one of

- a JSON object, one event: ``{"stream": "api-1", "ts": 1767225600000, "value": 1.5}``;
  multivariate events carry the features as named fields (``"cpu": 0.5, "mem": 0.7``), as a
  ``values`` object (``{"cpu": 0.5, "mem": 0.7}``) or as a ``values`` list in the model's
  feature order; ``null`` is a missing value (the detector skips it);
- a JSON array of such objects (many events in one record: kafka-python's cost is per record);
- an Arrow IPC stream whose columns are the stream id, the timestamp and the features.

A ``--time-delta`` model's "dt" is no input: the detector derives it from the timestamps,
so events carry the other features (see ``Decoder``'s ``derived``).

The stream id falls back to the message key when the event has none. Field names are
configurable (:class:`Format`). A message that cannot be decoded or validated is rejected
as a whole with a reason; the daemon sends it, unchanged, to the dead-letter topic.

Every event gets an *event offset* ``message offset * 2**20 + index in the message``: it
grows strictly along a partition, so the detector's idempotent-restart rule (skip events at
or below a stream's recorded last offset) also works for messages that carry many events.
A producer's retry (the same events again under a new offset) passes that rule; its events
are not applied for sharing their stream's last applied timestamp (``same_ts_dropped``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Annotated

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamrnn.data import EPOCH_SECONDS_RANGE
from streamrnn.kernels.idmap import MAX_ID_BYTES

__all__ = ["Format", "Decoder", "DecodedBatch", "Rejected", "EVENT_OFFSET_SHIFT",
           "event_offset", "message_offset", "encode_events"]

#: Events per message are numbered in the low bits of the event offset.
EVENT_OFFSET_SHIFT = 20
MAX_EVENTS_PER_MESSAGE = 1 << EVENT_OFFSET_SHIFT
_ARROW_MAGIC = b"\xff\xff\xff\xff"
#: Event times the detector can hold (int64 epoch ms): a larger JSON integer is rejected
#: with the message instead of overflowing the batch's array.
_TS = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]


def event_offset(message_offset: int, index: int = 0) -> int:
    """The detector offset of event ``index`` of the message at ``message_offset``."""
    return (int(message_offset) << EVENT_OFFSET_SHIFT) + int(index)


def message_offset(event_off: int) -> int:
    """The input message offset an event offset came from."""
    return int(event_off) >> EVENT_OFFSET_SHIFT


@dataclass(frozen=True)
class Format:
    """Field names of the input events."""

    stream: str = "stream"
    ts: str = "ts"
    value: str = "value"
    values: str = "values"


@dataclass
class Rejected:
    """A message that goes to the dead-letter topic."""

    index: int  # position in the batch of messages given to the decoder
    reason: str


@dataclass
class DecodedBatch:
    """Events decoded from a batch of messages, in message order."""

    stream_ids: list[str]
    timestamps: np.ndarray  # (E,) int64 epoch ms
    values: np.ndarray  # (E, D) float64, NaN = missing
    offsets: np.ndarray  # (E,) int64 event offsets (see module doc)
    messages_ok: int
    rejected: list[Rejected] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.stream_ids)


class _Invalid(Exception):
    pass


class Decoder:
    """Decodes batches of message values for a model's features.

    Parameters
    ----------
    feature_names : list of str
        The model's features, in order.
    fmt : Format
        Input field names.
    derived : list of str
        Model features after ``feature_names`` that the detector derives (a ``--time-delta``
        model's "dt", :func:`streamrnn.detector.input_features`): events need not carry them;
        one that does (a field, a ``values`` key or trailing list item, an Arrow column) has
        them ignored.

    Examples
    --------
    >>> d = Decoder(["value"])
    >>> b = d.decode([b'{"stream": "a", "ts": 5, "value": 1.5}', b'not json'], [b"a", None], [7, 8])
    >>> b.stream_ids, b.values.tolist(), [r.reason[:12] for r in b.rejected]
    (['a'], [[1.5]], ['invalid JSON'])
    """

    def __init__(self, feature_names: list[str], fmt: Format | None = None, derived: list[str] = ()) -> None:
        self.features = list(feature_names)
        self.fmt = fmt or Format()
        self.d = len(self.features)
        self._list_lengths = (self.d, self.d + len(derived))
        f = self.fmt
        reserved = {f.stream, f.ts, f.value, f.values}
        named = [n for n in self.features if n not in reserved]
        # The event type: stream and value fields optional, checked after decoding so
        # that the dead-letter reason can say what is wrong.
        unset = msgspec.UNSET
        fields = [("t", _TS), ("s", str | None | msgspec.UnsetType, unset),
                  ("v", float | None | msgspec.UnsetType, unset),
                  ("vs", dict[str, float | None] | list[float | None] | msgspec.UnsetType, unset)]
        rename = {"s": f.stream, "t": f.ts, "v": f.value, "vs": f.values}
        for i, name in enumerate(named):
            fields.append((f"f{i}", float | None | msgspec.UnsetType, unset))
            rename[f"f{i}"] = name
        self._named = named
        self._event = msgspec.defstruct("Event", fields, rename=rename, forbid_unknown_fields=False,
                                      gc=False)  # no cyclic-GC tracking: many short-lived events
        one = self._event | list[self._event]
        self._one = msgspec.json.Decoder(one)
        self._many = msgspec.json.Decoder(list[one])
        self._plain = self._plain_decoder(fields, rename) if self.d == 1 else None

    @staticmethod
    def _plain_decoder(fields: list, rename: dict):
        """A decoder of the common batch, for one-feature models: every message one event
        with a non-empty stream id of plainly valid length (a str of n code points is at most
        4n utf-8 bytes), a value (null: missing) and no values field. Its types check what a
        Python pass per event checked before; any other batch fails it and takes the general
        path, which names what is wrong. The other fields keep the event type's types, so a
        message is refused exactly when the event type refuses it."""
        plain = [("t", _TS), ("s", Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_BYTES // 4)]),
                 ("v", float | None), ("vs", msgspec.UnsetType, msgspec.UNSET)]
        plain += [f for f in fields if f[0].startswith("f")]
        struct = msgspec.defstruct("PlainEvent", plain, rename=rename, forbid_unknown_fields=False, gc=False)
        return msgspec.json.Decoder(list[struct])

    # ------------------------------------------------------------------ public
    def decode(self, values: list[bytes | None], keys: list[bytes | None], offsets: list[int]) -> DecodedBatch:
        """Decode message ``values`` (with their ``keys`` and message ``offsets``)."""
        ids: list[str] = []
        ts: list[int] = []
        vals: list[list[float]] = []
        eoffs: list[int] = []
        rejected: list[Rejected] = []
        joined = _join(values)
        fast = self._decode_plain(joined, len(values), offsets)
        if fast is not None:
            return fast
        parsed = self._parse_all(values, joined)
        for i, msg in enumerate(parsed):
            if isinstance(msg, Rejected):
                rejected.append(msg)
                continue
            try:
                if isinstance(msg, pa.Table):
                    self._append_arrow(msg, offsets[i], ids, ts, vals, eoffs)
                else:
                    self._append_json(msg, keys[i], offsets[i], ids, ts, vals, eoffs)
            except _Invalid as exc:
                rejected.append(Rejected(i, str(exc)))
        n = len(ids)
        x = np.array(vals, dtype=np.float64).reshape(n, self.d) if n else np.empty((0, self.d))
        return DecodedBatch(ids, np.array(ts, np.int64), x, np.array(eoffs, np.int64),
                            len(values) - len(rejected), rejected)

    def _decode_plain(self, joined: bytes | None, n: int, offsets) -> DecodedBatch | None:
        """The common batch (see :meth:`_plain_decoder`) in one msgspec call and three
        C-level passes, without Python work per event (None: take the general path)."""
        if self._plain is None or joined is None or not n:
            return None
        try:
            parsed = self._plain.decode(joined)
        except msgspec.DecodeError:  # also msgspec.ValidationError
            return None
        if len(parsed) != n:  # see _parse_all
            return None
        x = np.array(list(map(_GET_V, parsed)), dtype=np.float64).reshape(n, 1)  # None (JSON null) -> NaN
        ts = np.fromiter(map(_GET_T, parsed), np.int64, n)
        if _any_epoch_seconds(ts):  # the general path names the messages
            return None
        return DecodedBatch(list(map(_GET_S, parsed)), ts, x, np.array(offsets, np.int64) << EVENT_OFFSET_SHIFT, n)

    # ------------------------------------------------------------------ parsing
    def _parse_all(self, values, joined: bytes | None):
        """One msgspec call for all JSON messages of the batch (``joined``, see
        :func:`_join`); per message only when the batch holds a bad one (to find it) or
        Arrow messages.

        The joined array must hold exactly one item per message: a message such as
        ``{...},{...}`` (not JSON on its own) would otherwise join into two items and shift
        every later event onto another message's offset and key."""
        if values and joined is not None:
            try:
                parsed = self._many.decode(joined)
            except msgspec.DecodeError:
                parsed = None
            if parsed is not None and len(parsed) == len(values):
                return parsed
        return [self._parse_one(i, v) for i, v in enumerate(values)]

    def _parse_one(self, i: int, value: bytes | None):
        if not value:
            return Rejected(i, "empty message (a tombstone or no value)")
        if value[:4] == _ARROW_MAGIC:
            try:
                return pa.ipc.open_stream(pa.py_buffer(value)).read_all()
            except (pa.ArrowException, OSError, ValueError) as exc:
                return Rejected(i, f"invalid Arrow IPC stream: {exc}")
        try:
            return self._one.decode(value)
        except msgspec.ValidationError as exc:
            return Rejected(i, f"invalid event: {exc}")
        except msgspec.DecodeError as exc:
            return Rejected(i, f"invalid JSON: {exc}")

    # ------------------------------------------------------------------ JSON events
    def _append_json(self, msg, key, moff, ids, ts, vals, eoffs) -> None:
        events = msg if isinstance(msg, list) else (msg,)
        if not events:
            raise _Invalid("empty JSON array")
        if len(events) > MAX_EVENTS_PER_MESSAGE:
            raise _Invalid(f"{len(events)} events in one message; the limit is {MAX_EVENTS_PER_MESSAGE}")
        key_id = None
        start = len(ids)
        try:
            for j, e in enumerate(events):
                sid = e.s
                if not sid:
                    if key_id is None:
                        key_id = self._key_id(key)
                    sid = key_id
                _check_id_length(sid)
                if _SECONDS_LO <= e.t < _SECONDS_HI:
                    raise _Invalid(_seconds_reason(f"event {j}", e.t))
                ids.append(sid)
                ts.append(e.t)
                vals.append(self._features(e, j))
        except _Invalid:
            del ids[start:], ts[start:], vals[start:]
            raise
        base = int(moff) << EVENT_OFFSET_SHIFT
        eoffs.extend(range(base, base + len(events)))

    def _key_id(self, key) -> str:
        if not key:
            raise _Invalid(f"event has no {self.fmt.stream!r} field and the message has no key")
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            raise _Invalid("message key is not utf-8 and the event has no stream field") from None

    def _features(self, e, j: int) -> list[float]:
        f = self.fmt
        if e.vs is not msgspec.UNSET:
            vs = e.vs
            if isinstance(vs, list):
                if len(vs) not in self._list_lengths:
                    raise _Invalid(f"event {j}: {f.values!r} has {len(vs)} values; the model takes {self.d} "
                                   f"({', '.join(self.features)})")
                return [math.nan if v is None else v for v in vs[:self.d]]
            missing = [n for n in self.features if n not in vs]
            if missing:
                raise _Invalid(f"event {j}: {f.values!r} lacks feature(s) {missing}")
            return [math.nan if vs[n] is None else vs[n] for n in self.features]
        if self.d == 1 and e.v is not msgspec.UNSET:
            return [math.nan if e.v is None else e.v]
        out = []
        for n in self.features:
            v = getattr(e, f"f{self._named.index(n)}", msgspec.UNSET) if n in self._named else msgspec.UNSET
            if v is msgspec.UNSET:
                want = f"{f.value!r}" if self.d == 1 else f"{f.values!r} or the fields {self.features}"
                raise _Invalid(f"event {j}: no value; expected {want}")
            out.append(math.nan if v is None else v)
        return out

    # ------------------------------------------------------------------ Arrow batches
    def _append_arrow(self, table: pa.Table, moff, ids, ts, vals, eoffs) -> None:
        f = self.fmt
        n = table.num_rows
        if n == 0:
            raise _Invalid("empty Arrow batch")
        if n > MAX_EVENTS_PER_MESSAGE:
            raise _Invalid(f"{n} events in one message; the limit is {MAX_EVENTS_PER_MESSAGE}")
        names = set(table.column_names)
        feats = [f.value] if self.d == 1 and f.value in names and self.features[0] not in names else self.features
        missing = [c for c in (f.stream, f.ts, *feats) if c not in names]
        if missing:
            raise _Invalid(f"Arrow batch lacks column(s) {missing}")
        try:
            sid = table.column(f.stream).cast(pa.string())
            t = table.column(f.ts)
            if pa.types.is_timestamp(t.type):
                t = t.cast(pa.timestamp("ms")).cast(pa.int64())
            t = t.cast(pa.int64())
            cols = [table.column(c).cast(pa.float64()) for c in feats]
        except (pa.ArrowException, ValueError) as exc:
            raise _Invalid(f"Arrow batch has a column of the wrong type: {exc}") from None
        if sid.null_count or t.null_count:
            raise _Invalid("Arrow batch has null stream ids or timestamps")
        if pc.min(pc.binary_length(sid)).as_py() == 0:
            raise _Invalid("Arrow batch has an empty stream id")
        longest = pc.max(pc.binary_length(sid)).as_py()
        if longest > MAX_ID_BYTES:
            raise _Invalid(f"Arrow batch has a stream id of {longest} utf-8 bytes; the limit is {MAX_ID_BYTES}")
        tn = t.to_numpy()
        if _any_epoch_seconds(tn):
            first = int(tn[np.argmax((tn >= _SECONDS_LO) & (tn < _SECONDS_HI))])
            raise _Invalid(_seconds_reason("Arrow batch", first))
        ids.extend(sid.to_pylist())
        ts.extend(tn.tolist())
        x = np.column_stack([c.to_numpy(zero_copy_only=False) for c in cols]) if cols else np.empty((n, 0))
        vals.extend(x.tolist())
        base = int(moff) << EVENT_OFFSET_SHIFT
        eoffs.extend(range(base, base + n))


#: Epoch-second clocks read as milliseconds fall in January 1970 (streamrnn.data refuses such
#: files too): scoring them would silently misplace every alert, so their messages are
#: dead-lettered with the reason instead.
_SECONDS_LO, _SECONDS_HI = EPOCH_SECONDS_RANGE


def _any_epoch_seconds(ts: np.ndarray) -> bool:
    return bool(ts.size) and bool(((ts >= _SECONDS_LO) & (ts < _SECONDS_HI)).any())


def _seconds_reason(what: str, t: int) -> str:
    return (f"{what}: timestamp {t} looks like epoch seconds (as milliseconds it is a day in "
            f"January 1970); timestamps must be epoch milliseconds")


def _check_id_length(sid: str) -> None:
    if 4 * len(sid) > MAX_ID_BYTES and len(sid.encode("utf-8")) > MAX_ID_BYTES:
        raise _Invalid(f"stream id of {len(sid.encode('utf-8'))} utf-8 bytes; the limit is {MAX_ID_BYTES}")


def _join(values: list) -> bytes | None:
    """The message values as one JSON array (None when one is None: a tombstone)."""
    try:
        return b"[" + b",".join(values) + b"]"
    except TypeError:
        return None


_GET_S, _GET_T, _GET_V = (operator.attrgetter(a) for a in ("s", "t", "v"))
_JSON = msgspec.json.Encoder()


def encode_events(stream_ids, timestamps, values, feature_names: list[str], *, fmt: Format | None = None,
                  arrow: bool = False) -> bytes:
    """One message value carrying the given events (the producer side of :class:`Decoder`).

    A single event is a JSON object; several are a JSON array, or an Arrow IPC stream when
    ``arrow`` is True.
    """
    fmt = fmt or Format()
    x = np.asarray(values, dtype=np.float64).reshape(len(stream_ids), -1)
    if arrow:
        cols = {fmt.stream: pa.array(list(stream_ids), pa.string()),
                fmt.ts: pa.array(np.asarray(timestamps, np.int64))}
        for j, n in enumerate(feature_names):
            cols[n] = pa.array(x[:, j])
        t = pa.table(cols)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
        return sink.getvalue().to_pybytes()
    rows = x.tolist()
    single = len(feature_names) == 1
    events = []
    for s, t, r in zip(stream_ids, np.asarray(timestamps).tolist(), rows):
        r = [None if v != v else v for v in r]  # NaN -> null: JSON has no NaN
        ev = {fmt.stream: str(s), fmt.ts: int(t)}
        if single:
            ev[fmt.value] = r[0]
        else:
            ev[fmt.values] = dict(zip(feature_names, r))
        events.append(ev)
    return _JSON.encode(events[0] if len(events) == 1 else events)
