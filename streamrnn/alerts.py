"""The alert record: one schema for replay output, the daemon's alerts topic and the tests.

An alert is an episode: one ``open`` record when a stream's score crosses the threshold and
one ``close`` record when it has stayed below the lower threshold long enough. Both carry
the same ``alert_id`` = ``"<stream>:<ts of the opening event in epoch ms>"``, so a consumer
of an at-least-once topic can de-duplicate on ``(alert_id, kind)``.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import pyarrow as pa


class ModelRef(msgspec.Struct, frozen=True):
    """Which model raised the alert."""

    name: str
    version: str


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One alert record (``kind`` open or close)."""

    alert_id: str
    stream: str
    ts: int  # epoch ms of the event this record is about (the opening event for "open")
    kind: Literal["open", "close"]
    score: float
    threshold: float
    values: dict[str, float]  # observed, raw units, by feature name
    predicted: dict[str, float]  # the one-step-ahead prediction for that event, raw units
    top_features: list[str]  # features that contributed most to the score, largest first
    model: ModelRef


def alert_id(stream: str, open_ts: int) -> str:
    return f"{stream}:{int(open_ts)}"


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Alert)


def encode_alert(alert: Alert) -> bytes:
    """JSON bytes of one alert (the daemon's message value)."""
    return _ENCODER.encode(alert)


def decode_alert(data: bytes) -> Alert:
    return _DECODER.decode(data)


ALERT_SCHEMA = pa.schema([
    ("alert_id", pa.string()),
    ("stream", pa.string()),
    ("ts", pa.timestamp("ms", tz="UTC")),
    ("kind", pa.string()),
    ("score", pa.float64()),
    ("threshold", pa.float64()),
    ("values", pa.map_(pa.string(), pa.float64())),
    ("predicted", pa.map_(pa.string(), pa.float64())),
    ("top_features", pa.list_(pa.string())),
    ("model", pa.struct([("name", pa.string()), ("version", pa.string())])),
])


def alerts_to_arrow(alerts: list[Alert]) -> pa.Table:
    """An Arrow table with :data:`ALERT_SCHEMA` (for ``--alerts-out`` Parquet)."""
    return pa.Table.from_pylist([
        {"alert_id": a.alert_id, "stream": a.stream, "ts": a.ts, "kind": a.kind, "score": a.score,
         "threshold": a.threshold, "values": list(a.values.items()),
         "predicted": list(a.predicted.items()), "top_features": list(a.top_features),
         "model": {"name": a.model.name, "version": a.model.version}}
        for a in alerts], schema=ALERT_SCHEMA)


def alerts_from_arrow(table: pa.Table) -> list[Alert]:
    """The inverse of :func:`alerts_to_arrow`."""
    out = []
    i = table.schema.get_field_index("ts")
    table = table.set_column(i, "ts", table.column("ts").cast(pa.int64()))
    for row in table.to_pylist():
        out.append(Alert(alert_id=row["alert_id"], stream=row["stream"],
                         ts=row["ts"],
                         kind=row["kind"], score=row["score"], threshold=row["threshold"],
                         values=dict(row["values"]), predicted=dict(row["predicted"]),
                         top_features=list(row["top_features"]),
                         model=ModelRef(row["model"]["name"], row["model"]["version"])))
    return out
