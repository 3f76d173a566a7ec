"""A lateness buffer that drivers can put in front of the Detector.

Events of a stream can arrive slightly out of order (several producers, retries). The
:class:`~streamrnn.detector.Detector` drops an event older than its stream's last applied
one; a :class:`ReorderBuffer` holds events back until the event-time watermark (the largest
timestamp seen minus ``allowed_lateness_ms``) has passed them and releases them in
timestamp order, so events late by up to the allowed lateness are scored in order. Events
later than that are released at once (the Detector then drops and counts them).
"""

from __future__ import annotations

import numpy as np

from streamrnn.errors import StreamrnnError


class ReorderBuffer:
    """Hold events until ``max_ts_seen - allowed_lateness_ms`` passes them; release in ts order.

    Release order is by timestamp, ties by arrival order (stable), so a stream's events
    with equal timestamps keep their order.

    Examples
    --------
    >>> import numpy as np
    >>> buf = ReorderBuffer(allowed_lateness_ms=10)
    >>> buf.push(["a", "a"], np.array([[1.0], [2.0]]), np.array([20, 5]))[2].tolist()
    [5]
    >>> buf.flush()[2].tolist()
    [20]
    """

    def __init__(self, allowed_lateness_ms: int) -> None:
        if isinstance(allowed_lateness_ms, bool) or not isinstance(allowed_lateness_ms, (int, np.integer)) \
                or allowed_lateness_ms < 0:
            raise StreamrnnError(f"allowed_lateness_ms must be an integer >= 0; got {allowed_lateness_ms!r}")
        self.allowed_lateness_ms = int(allowed_lateness_ms)
        self._ids: list[str] = []
        self._values: list[np.ndarray] = []
        self._ts: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        self._max_ts: int | None = None
        self._with_offsets: bool | None = None
        self.released_late = 0  # events released behind the watermark (already too late)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def watermark(self) -> int | None:
        """Events at or before this timestamp are released; None before the first event."""
        return None if self._max_ts is None else self._max_ts - self.allowed_lateness_ms

    def push(self, stream_ids, values, timestamps, offsets=None):
        """Add a batch; returns ``(stream_ids, values, timestamps, offsets)`` now releasable.

        ``offsets`` is None when never given; otherwise every push must give them.
        """
        ts = np.asarray(timestamps, np.int64)
        x = np.asarray(values, np.float64)
        if x.ndim == 1:
            x = x[:, None]
        n = ts.shape[0]
        if len(stream_ids) != n or x.shape[0] != n:
            raise StreamrnnError("stream_ids, values and timestamps must have one entry per event")
        if self._with_offsets is None:
            self._with_offsets = offsets is not None
        elif self._with_offsets != (offsets is not None):
            raise StreamrnnError("give offsets with every push or with none")
        if n == 0:
            return self._release()
        before = self.watermark
        if before is not None:
            self.released_late += int((ts < before).sum())
        self._ids.extend(str(s) for s in stream_ids)
        self._values.append(x)
        self._ts.append(ts)
        if offsets is not None:
            self._offsets.append(np.asarray(offsets, np.int64))
        top = int(ts.max())
        self._max_ts = top if self._max_ts is None else max(self._max_ts, top)
        return self._release()

    def flush(self):
        """Release everything held, in timestamp order (end of input)."""
        return self._release(everything=True)

    def _release(self, everything: bool = False):
        if not self._ids:
            return [], np.empty((0, self._width()), np.float64), np.empty(0, np.int64), \
                (np.empty(0, np.int64) if self._with_offsets else None)
        ts = np.concatenate(self._ts)
        x = np.concatenate(self._values)
        off = np.concatenate(self._offsets) if self._offsets else None
        order = np.argsort(ts, kind="stable")
        cut = len(order) if everything else int(np.searchsorted(ts[order], self.watermark, side="right"))
        out_idx, keep_idx = order[:cut], np.sort(order[cut:])
        ids = self._ids
        released = ([ids[i] for i in out_idx.tolist()], x[out_idx], ts[out_idx],
                     None if off is None else off[out_idx])
        self._ids = [ids[i] for i in keep_idx.tolist()]
        self._values = [x[keep_idx]]
        self._ts = [ts[keep_idx]]
        self._offsets = [off[keep_idx]] if off is not None else []
        return released

    def _width(self) -> int:
        return self._values[0].shape[1] if self._values else 1
