"""Model: recurrent weights, linear head and the metadata that travels with them.

Weights use PyTorch's layout (``weight_ih``/``weight_hh`` with gate blocks i, f, g, o for
LSTM and r, z, n for GRU) so models move between frameworks without reshuffling. Model
files are safetensors with JSON metadata: data only, nothing in them can execute.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numba
import numpy as np

from streamrnn.errors import ModelFileError, StreamrnnError
from streamrnn.kernels import cells as _cells
from streamrnn.kernels.stream import forward_sequences
from streamrnn.modelfile import SUPPORTED_FORMAT_VERSION as FORMAT_VERSION

CELLS = ("rnn", "lstm", "gru")
HEADS = ("linear", "gaussian")
_GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def _package_version() -> str:
    from streamrnn import __version__

    return __version__


class PackedWeights(NamedTuple):
    """Weights rearranged for the kernels (transposed, biases folded, float32, contiguous)."""

    cell: int
    reset_after: bool
    hidden: np.ndarray  # (L,) int64
    offsets: np.ndarray  # (L,) int64: start of each layer's h in a state row (c follows h)
    state_width: int
    wx: tuple  # L x (D_in, G*H)
    wh: tuple  # L x (H, G*H)
    b: tuple  # L x (G*H,)  input and recurrent biases summed, except GRU's n gate
    bhn: tuple  # L x (H,)   GRU recurrent n-gate bias (zeros for other cells)
    peep: tuple  # L x (3, H) LSTM peepholes i, f, o (zeros when off)
    wo: np.ndarray  # (H_top, O)
    bo: np.ndarray  # (O,)

    def kernel_args(self) -> tuple:
        """The trailing arguments every stream kernel takes, in order.

        The per-layer tuples are padded with empty arrays to at least ``LAYER_SLOTS``
        entries (the kernels read ``len(hidden)`` layers): a tuple's length is part of its
        Numba type, so without padding every depth from 1 to 4 compiled the whole step
        machinery again (minutes each, cold)."""
        return (self.cell, self.reset_after, self.hidden, self.offsets, _pad(self.wx), _pad(self.wh),
                _pad(self.b), _pad(self.bhn), _pad(self.peep), self.wo, self.bo)


#: Layer slots of the kernels' weight tuples (deeper models get a tuple of their own length).
LAYER_SLOTS = 4


def _pad(per_layer: tuple) -> tuple:
    """``per_layer`` followed by empty arrays of the same kind, LAYER_SLOTS entries at least."""
    missing = LAYER_SLOTS - len(per_layer)
    if missing <= 0:
        return per_layer
    first = per_layer[0]
    key = (first.ndim, first.dtype)
    if key not in _EMPTY:
        _EMPTY[key] = np.zeros((0,) * first.ndim, first.dtype)
    return per_layer + (_EMPTY[key],) * missing


_EMPTY: dict = {}  # one shared empty array per (ndim, dtype): kernel_args runs per batch


@dataclass(eq=False)
class Model:
    """A stacked recurrent network with a linear head predicting the next event.

    Parameters
    ----------
    cell : {"rnn", "lstm", "gru"}
    layers : list of dict
        Per layer ``w_ih`` (G*H, D_in), ``w_hh`` (G*H, H), ``b_ih`` and ``b_hh`` (G*H,), and
        for LSTM with peepholes ``peep`` (3, H) holding the i, f, o peephole weights.
    head_weight, head_bias : ndarray
        Linear head (O, H_top) and (O,): O = n_features for the ``"linear"`` head; for the
        ``"gaussian"`` head O = 2 * n_features, the means then the log-variances (scaled units).
    head : {"linear", "gaussian"}
        What the head predicts: the next event, or a mean and log-variance per feature.
    stream_scaler : dict or None
        Per-stream scalers ``{"streams": [ids], "mean": (S, D), "scale": (S, D)}``; streams
        not in the table use ``scaler_mean``/``scaler_scale``.
    reset_after : bool
        GRU only: reset gate applied after the recurrent product (PyTorch, Keras default)
        or before it (Cho et al., Keras ``reset_after=False``).
    peephole : bool
        LSTM only: peephole connections from the cell state to the gates.

    Examples
    --------
    >>> import numpy as np
    >>> m = Model.random(cell="gru", n_features=2, hidden=[8], seed=0)
    >>> m.predict(np.zeros((5, 2), np.float32)).shape
    (5, 2)
    """

    cell: str
    layers: list[dict[str, np.ndarray]]
    head_weight: np.ndarray
    head_bias: np.ndarray
    reset_after: bool = True
    peephole: bool = False
    nonlinearity: str = "tanh"
    feature_names: list[str] = field(default_factory=list)
    scaler_mean: np.ndarray | None = None
    scaler_scale: np.ndarray | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)
    name: str = "model"
    version: str = "1"
    created: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    streamrnn_version: str = ""
    head: str = "linear"
    stream_scaler: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.layers = [{k: np.ascontiguousarray(v, np.float32) for k, v in layer.items()}
                       for layer in self.layers]
        self.head_weight = np.ascontiguousarray(self.head_weight, np.float32)
        self.head_bias = np.ascontiguousarray(self.head_bias, np.float32)
        d = self.n_features
        if not self.feature_names:
            self.feature_names = ["value"] if d == 1 else [f"x{i}" for i in range(d)]
        self.scaler_mean = (np.zeros(d) if self.scaler_mean is None
                            else np.asarray(self.scaler_mean, np.float64).reshape(-1))
        self.scaler_scale = (np.ones(d) if self.scaler_scale is None
                             else np.asarray(self.scaler_scale, np.float64).reshape(-1))
        if self.stream_scaler is not None:
            self.stream_scaler = {
                "streams": [str(s) for s in self.stream_scaler["streams"]],
                "mean": np.asarray(self.stream_scaler["mean"], np.float64).reshape(-1, d),
                "scale": np.asarray(self.stream_scaler["scale"], np.float64).reshape(-1, d)}
        self.created = self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.streamrnn_version = self.streamrnn_version or _package_version()
        self.validate()

    # ----------------------------------------------------------------- shape facts
    @property
    def n_features(self) -> int:
        return int(self.layers[0]["w_ih"].shape[1]) if self.layers else 0

    @property
    def hidden(self) -> list[int]:
        return [int(layer["w_hh"].shape[1]) for layer in self.layers]

    @property
    def n_outputs(self) -> int:
        return int(self.head_weight.shape[0])

    @property
    def state_width(self) -> int:
        """float32 values of recurrent state per stream (h of every layer, and c for LSTM)."""
        return sum(self.hidden) * (2 if self.cell == "lstm" else 1)

    def flops_per_event(self) -> int:
        """Multiply-adds x 2 of one step: the matrix products, gates not counted."""
        g = _GATES[self.cell]
        total, d_in = 0, self.n_features
        for h in self.hidden:
            total += 2 * g * h * (d_in + h)
            d_in = h
        return total + 2 * self.n_outputs * d_in

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check cell, shapes and values; raise ModelFileError saying what is wrong."""
        if self.cell not in CELLS:
            raise ModelFileError(f"unknown cell {self.cell!r}; expected one of {', '.join(CELLS)}")
        if self.nonlinearity not in ("tanh", "relu") or (self.nonlinearity == "relu" and self.cell != "rnn"):
            raise ModelFileError(f"nonlinearity {self.nonlinearity!r} is only 'tanh' (or 'relu' for rnn)")
        if self.peephole and self.cell != "lstm":
            raise ModelFileError("peephole connections exist only for the lstm cell")
        if not self.layers:
            raise ModelFileError("a model needs at least one recurrent layer")
        g = _GATES[self.cell]
        d_in = self.n_features
        if d_in < 1:
            raise ModelFileError("the first layer's w_ih must have at least one input column")
        for i, layer in enumerate(self.layers):
            h = layer["w_hh"].shape[1] if layer.get("w_hh") is not None and layer["w_hh"].ndim == 2 else -1
            want = {"w_ih": (g * h, d_in), "w_hh": (g * h, h), "b_ih": (g * h,), "b_hh": (g * h,)}
            if self.peephole:
                want["peep"] = (3, h)
            for key, shape in want.items():
                arr = layer.get(key)
                if arr is None:
                    raise ModelFileError(f"layer {i}: missing weight {key!r}")
                if arr.shape != shape or h < 1:
                    raise ModelFileError(f"layer {i}: {key} has shape {arr.shape}, expected {shape} "
                                         f"for a {self.cell} layer with {h} units and {d_in} inputs")
            extra = set(layer) - set(want)
            if extra:
                raise ModelFileError(f"layer {i}: unexpected weights {sorted(extra)}")
            d_in = h
        if self.head not in HEADS:
            raise ModelFileError(f"unknown head {self.head!r}; expected one of {', '.join(HEADS)}")
        n_out = self.n_features * (2 if self.head == "gaussian" else 1)
        if self.head_weight.shape != (n_out, d_in) or self.head_bias.shape != (n_out,):
            raise ModelFileError(f"{self.head} head has shapes {self.head_weight.shape} and "
                                 f"{self.head_bias.shape}, expected ({n_out}, {d_in}) and ({n_out},)")
        for label, arr in self._named_arrays():
            if not np.all(np.isfinite(arr)):
                raise ModelFileError(f"weight {label} contains NaN or infinite values")
        if len(self.feature_names) != self.n_features:
            raise ModelFileError(f"{len(self.feature_names)} feature names for {self.n_features} features")
        if self.scaler_mean.shape != (self.n_features,) or self.scaler_scale.shape != (self.n_features,):
            raise ModelFileError("scaler mean and scale must have one value per feature")
        if not (np.all(np.isfinite(self.scaler_mean)) and np.all(self.scaler_scale > 0)
                and np.all(np.isfinite(self.scaler_scale))):
            raise ModelFileError("scaler mean must be finite and scale finite and positive")
        self._validate_stream_scaler()

    def _validate_stream_scaler(self) -> None:
        ss = self.stream_scaler
        if ss is None:
            return
        n = len(ss["streams"])
        if ss["mean"].shape != (n, self.n_features) or ss["scale"].shape != (n, self.n_features):
            raise ModelFileError(f"per-stream scaler for {n} streams needs mean and scale of shape "
                                 f"({n}, {self.n_features}); got {ss['mean'].shape} and {ss['scale'].shape}")
        if len(set(ss["streams"])) != n:
            raise ModelFileError("per-stream scaler lists a stream more than once")
        if not (np.all(np.isfinite(ss["mean"])) and np.all(np.isfinite(ss["scale"]))
                and np.all(ss["scale"] > 0)):
            raise ModelFileError("per-stream scaler mean must be finite and scale finite and positive")

    def _named_arrays(self):
        for i, layer in enumerate(self.layers):
            for key, arr in layer.items():
                yield f"layers.{i}.{key}", arr
        yield "head.weight", self.head_weight
        yield "head.bias", self.head_bias

    # -------------------------------------------------------------- construction
    @classmethod
    def random(cls, cell: str = "gru", n_features: int = 1, hidden: list[int] | int = (32,),
               seed: int = 0, **options: Any) -> "Model":
        """A model with PyTorch's default initialisation, U(-1/sqrt(H), 1/sqrt(H)).

        ``options`` are further Model fields (reset_after, peephole, feature_names, ...).
        """
        if cell not in CELLS:
            raise StreamrnnError(f"unknown cell {cell!r}; expected one of {', '.join(CELLS)}")
        hidden = [int(hidden)] if np.isscalar(hidden) else [int(h) for h in hidden]
        if not hidden or min(hidden) < 1 or int(n_features) < 1:
            raise StreamrnnError("n_features and every hidden size must be positive integers")
        rng = np.random.default_rng(seed)
        g = _GATES[cell]
        layers, d_in = [], int(n_features)
        for h in hidden:
            k = 1.0 / math.sqrt(h)
            layer = {"w_ih": rng.uniform(-k, k, (g * h, d_in)), "w_hh": rng.uniform(-k, k, (g * h, h)),
                     "b_ih": rng.uniform(-k, k, g * h), "b_hh": rng.uniform(-k, k, g * h)}
            if options.get("peephole"):
                layer["peep"] = rng.uniform(-k, k, (3, h))
            layers.append(layer)
            d_in = h
        k = 1.0 / math.sqrt(d_in)
        n_out = n_features * (2 if options.get("head") == "gaussian" else 1)
        return cls(cell=cell, layers=layers, head_weight=rng.uniform(-k, k, (n_out, d_in)),
                   head_bias=rng.uniform(-k, k, n_out), **options)

    @classmethod
    def from_torch(cls, rnn: Any, head: Any, **options: Any) -> "Model":
        """Import ``torch.nn.LSTM``/``GRU``/``RNN`` (any num_layers) and a ``torch.nn.Linear`` head."""
        kind = type(rnn).__name__
        cell = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}.get(kind)
        if cell is None:
            raise StreamrnnError(f"from_torch takes nn.LSTM, nn.GRU or nn.RNN, not {kind}")
        if getattr(rnn, "bidirectional", False):
            raise StreamrnnError("bidirectional networks cannot run one step at a time on a stream")
        if getattr(rnn, "proj_size", 0):
            raise StreamrnnError("LSTM with proj_size is not supported")
        nonlinearity = getattr(rnn, "nonlinearity", "tanh")
        layers = []
        for i in range(rnn.num_layers):
            w_ih = _to_numpy(getattr(rnn, f"weight_ih_l{i}"))
            w_hh = _to_numpy(getattr(rnn, f"weight_hh_l{i}"))
            zeros = np.zeros(w_ih.shape[0], np.float32)
            b_ih = _to_numpy(getattr(rnn, f"bias_ih_l{i}")) if rnn.bias else zeros
            b_hh = _to_numpy(getattr(rnn, f"bias_hh_l{i}")) if rnn.bias else zeros
            layers.append({"w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh})
        head_w = _to_numpy(head.weight)
        head_b = _to_numpy(head.bias) if head.bias is not None else np.zeros(head_w.shape[0], np.float32)
        if head_w.shape[0] != rnn.input_size:
            raise StreamrnnError(f"the head must predict the next input: it has {head_w.shape[0]} "
                                 f"outputs for {rnn.input_size} input features")
        return cls(cell=cell, layers=layers, head_weight=head_w, head_bias=head_b,
                   nonlinearity=nonlinearity, **options)

    @classmethod
    def from_keras(cls, path: str | Path, **options: Any) -> "Model":
        """Import Keras 3 weights: a ``.weights.h5`` file or a ``.keras`` archive.

        A stack of LSTM, GRU or SimpleRNN layers (one cell type, tanh/sigmoid activations)
        followed by a Dense head. For a ``.weights.h5`` without biases pass ``reset_after=``;
        for a relu SimpleRNN pass ``nonlinearity="relu"`` (a ``.keras`` archive says both).
        """
        from streamrnn.keras_import import load_keras_weights

        return load_keras_weights(cls, Path(path), **options)

    # ------------------------------------------------------------------- kernels
    @cached_property
    def packed(self) -> PackedWeights:
        """Weights in the kernels' layout (computed once; a Model is treated as immutable)."""
        h = self.hidden
        code = {"gru": _cells.GRU, "lstm": _cells.LSTM}.get(
            self.cell, _cells.RNN_RELU if self.nonlinearity == "relu" else _cells.RNN_TANH)
        per = 2 if self.cell == "lstm" else 1
        offsets = np.cumsum([0] + [per * x for x in h[:-1]]).astype(np.int64)
        wx, wh, b, bhn, peep = [], [], [], [], []
        for layer, hs in zip(self.layers, h):
            wx.append(np.ascontiguousarray(layer["w_ih"].T))
            wh.append(np.ascontiguousarray(layer["w_hh"].T))
            bias = layer["b_ih"] + layer["b_hh"]
            rec_n = np.zeros(hs, np.float32)
            if self.cell == "gru":
                # n gate: the recurrent bias sits inside the reset product (reset_after) or
                # is added after W_hn (r * h); either way it must stay separate.
                bias[2 * hs:] = layer["b_ih"][2 * hs:]
                rec_n = layer["b_hh"][2 * hs:].copy()
            b.append(np.ascontiguousarray(bias, np.float32))
            bhn.append(rec_n)
            peep.append(np.ascontiguousarray(layer["peep"]) if self.peephole else np.zeros((3, hs), np.float32))
        return PackedWeights(code, bool(self.reset_after), np.asarray(h, np.int64), offsets,
                             self.state_width, tuple(wx), tuple(wh), tuple(b), tuple(bhn),
                             tuple(peep), np.ascontiguousarray(self.head_weight.T), self.head_bias.copy())

    def scale(self, x: np.ndarray) -> np.ndarray:
        """Raw units to the network's units (float32)."""
        return ((x - self.scaler_mean) / self.scaler_scale).astype(np.float32)

    def unscale(self, y: np.ndarray) -> np.ndarray:
        """Network units back to raw units (float64 arithmetic, float32 result)."""
        return (y * self.scaler_scale + self.scaler_mean).astype(np.float32)

    def scaler_for(self, stream_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Scaler (mean, scale) per event, each (E, D) float64.

        Streams in ``stream_scaler`` get their own; all others the global scaler.
        """
        ids = [str(s) for s in stream_ids]
        mean = np.broadcast_to(self.scaler_mean, (len(ids), self.n_features)).copy()
        scale = np.broadcast_to(self.scaler_scale, (len(ids), self.n_features)).copy()
        if self.stream_scaler is not None and ids:
            rows = self._stream_scaler_rows
            idx = np.array([rows.get(s, -1) for s in ids], np.int64)
            hit = idx >= 0
            mean[hit] = self.stream_scaler["mean"][idx[hit]]
            scale[hit] = self.stream_scaler["scale"][idx[hit]]
        return mean, scale

    def knows_stream(self, stream_ids: Any) -> np.ndarray:
        """(E,) bool: which streams have a scaler of their own in ``stream_scaler``."""
        if self.stream_scaler is None:
            return np.zeros(len(stream_ids), bool)
        rows = self._stream_scaler_rows
        return np.array([str(s) in rows for s in stream_ids], bool)

    @cached_property
    def _stream_scaler_rows(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.stream_scaler["streams"])}

    def predict(self, x: np.ndarray, stream: str | None = None) -> np.ndarray:
        """One-step-ahead predictions for whole sequences, in raw units.

        ``x`` is (T, D) or (B, T, D); output t is the prediction of x[t + 1] (the mean, for a
        Gaussian head). ``stream`` selects that stream's scaler (per-stream scalers).
        """
        mean, scale = self._scaler_of(stream)
        out = self._forward_scaled(x, mean, scale)
        return (out[..., : self.n_features] * scale + mean).astype(np.float32)

    def predict_distribution(self, x: np.ndarray, stream: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Predicted (mean, variance) of x[t + 1] in raw units, shapes as ``x``.

        A linear head has no variance of its own: it reports NaN variance.
        """
        mean_, scale = self._scaler_of(stream)
        out = self._forward_scaled(x, mean_, scale)
        d = self.n_features
        mean = (out[..., :d] * scale + mean_).astype(np.float32)
        if self.head != "gaussian":
            return mean, np.full_like(mean, np.nan)
        var = np.exp(out[..., d:].astype(np.float64)) * scale ** 2
        return mean, var

    def _scaler_of(self, stream: str | None) -> tuple[np.ndarray, np.ndarray]:
        if stream is None:
            return self.scaler_mean, self.scaler_scale
        mean, scale = self.scaler_for([stream])
        return mean[0], scale[0]

    def _forward_scaled(self, x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Head outputs in scaled units for (T, D) or (B, T, D) raw input."""
        arr = np.asarray(x)
        if arr.ndim not in (2, 3) or arr.shape[-1] != self.n_features:
            raise StreamrnnError(f"predict takes (T, {self.n_features}) or (B, T, {self.n_features}) "
                                 f"arrays; got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number):
            raise StreamrnnError(f"predict takes numeric arrays, not {arr.dtype}")
        batch = arr[None] if arr.ndim == 2 else arr
        p = self.packed
        state = np.zeros((batch.shape[0], p.state_width), np.float32)
        scaled = ((batch - mean) / scale).astype(np.float32)
        out = forward_sequences(np.ascontiguousarray(scaled), state, numba.get_num_threads(),
                                *p.kernel_args())
        return out[0] if arr.ndim == 2 else out

    # ----------------------------------------------------------------- file I/O
    def metadata(self) -> dict[str, Any]:
        return {"format": "streamrnn-model", "format_version": FORMAT_VERSION, "cell": self.cell,
                "n_features": self.n_features, "hidden": self.hidden, "reset_after": self.reset_after,
                "peephole": self.peephole, "nonlinearity": self.nonlinearity, "head": self.head,
                "feature_names": self.feature_names, "thresholds": self.thresholds, "name": self.name,
                "version": self.version, "created": self.created, "training": self.training,
                "streamrnn_version": self.streamrnn_version,
                "stream_scaler_streams": (None if self.stream_scaler is None
                                          else list(self.stream_scaler["streams"]))}

    def tensors(self) -> dict[str, np.ndarray]:
        out = dict(self._named_arrays())
        out["scaler.mean"] = self.scaler_mean
        out["scaler.scale"] = self.scaler_scale
        if self.stream_scaler is not None:
            out["scaler.stream_mean"] = self.stream_scaler["mean"]
            out["scaler.stream_scale"] = self.stream_scaler["scale"]
        return out

    def save(self, path: str | Path) -> Path:
        """Write the model as safetensors; written to a temporary file then renamed (atomic)."""
        from streamrnn.modelfile import write_model_file

        return write_model_file(Path(path), self.tensors(), self.metadata())

    @classmethod
    def load(cls, path: str | Path) -> "Model":
        """Read a model file written by :meth:`save`; any problem raises ModelFileError."""
        from streamrnn.modelfile import read_model_file

        tensors, meta = read_model_file(Path(path))
        return cls.from_parts(tensors, meta, source=str(Path(path)))

    @classmethod
    def from_parts(cls, tensors: dict[str, np.ndarray], meta: dict[str, Any], source: str = "model") -> "Model":
        """Build a model from a file's tensors and metadata; every problem is a ModelFileError."""
        try:
            return cls._from_parts(tensors, meta)
        except ModelFileError as exc:
            msg = str(exc)
            raise ModelFileError(msg if msg.startswith(f"{source}: ") else f"{source}: {msg}") from None
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ModelFileError(f"{source}: incomplete or inconsistent model metadata ({exc!r})") from None

    @classmethod
    def _from_parts(cls, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> "Model":
        required = {"head.weight", "head.bias", "scaler.mean", "scaler.scale"}
        missing = sorted(required - set(tensors))
        if missing:
            raise ModelFileError(f"missing tensor(s) {missing}")
        n_layers = len(meta["hidden"])
        layers = [{k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"layers.{i}.")}
                  for i in range(n_layers)]
        streams = meta.get("stream_scaler_streams")
        stream_scaler = None
        if streams is not None:
            stream_keys = {"scaler.stream_mean", "scaler.stream_scale"}
            if not stream_keys <= set(tensors):
                raise ModelFileError(f"metadata lists per-stream scalers but tensor(s) "
                                     f"{sorted(stream_keys - set(tensors))} are missing")
            required = required | stream_keys
            stream_scaler = {"streams": list(streams), "mean": tensors["scaler.stream_mean"],
                             "scale": tensors["scaler.stream_scale"]}
        known = {f"layers.{i}.{k}" for i, layer in enumerate(layers) for k in layer} | required
        unknown = set(tensors) - known
        if unknown:
            raise ModelFileError(f"unexpected tensors {sorted(unknown)[:5]}")
        model = cls(cell=meta["cell"], layers=layers, head_weight=tensors["head.weight"],
                    head_bias=tensors["head.bias"], reset_after=bool(meta["reset_after"]),
                    peephole=bool(meta["peephole"]), nonlinearity=meta.get("nonlinearity", "tanh"),
                    feature_names=list(meta["feature_names"]), scaler_mean=tensors["scaler.mean"],
                    scaler_scale=tensors["scaler.scale"], thresholds=dict(meta.get("thresholds", {})),
                    name=str(meta.get("name", "model")), version=str(meta.get("version", "1")),
                    created=str(meta.get("created", "")), training=dict(meta.get("training", {})),
                    streamrnn_version=str(meta.get("streamrnn_version", "")),
                    head=str(meta.get("head", "linear")), stream_scaler=stream_scaler)
        if model.hidden != list(meta["hidden"]) or model.n_features != meta.get("n_features", model.n_features):
            raise ModelFileError(f"metadata says hidden={meta['hidden']}, n_features={meta.get('n_features')} "
                                 f"but the weights have hidden={model.hidden}, n_features={model.n_features}")
        return model


def _to_numpy(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
