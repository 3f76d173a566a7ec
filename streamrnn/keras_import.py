"""Import Keras 3 recurrent models: a stack of LSTM, GRU or SimpleRNN layers and a Dense head.

Reads the weights with h5py alone (Keras itself is not needed) from a ``.weights.h5`` file
(``model.save_weights``) or from the ``model.weights.h5`` inside a ``.keras`` archive
(``model.save``). Keras 3 keys a layer's group by its class in snake case, numbered in
model order (``gru``, ``gru_1``, ...), and keeps a recurrent layer's variables under
``cell/vars/0..2`` (kernel, recurrent kernel, bias) and a Dense layer's under ``vars/0..1``.

What a weights file cannot say. It holds no activations, so a ``.weights.h5`` import assumes
Keras's defaults, the only ones the kernels run: ``activation="tanh"`` and
``recurrent_activation="sigmoid"`` for LSTM/GRU, a linear Dense head and layers applied in
order, recurrent first. SimpleRNN takes ``nonlinearity="relu"`` as an option when it used
relu. A ``.keras`` archive carries the config, and there every one of these is checked.

Layout conversion to PyTorch's (what :class:`~streamrnn.model.Model` holds):

- LSTM: Keras gates i, f, c, o are PyTorch's i, f, g, o: ``w_ih = kernel.T``,
  ``w_hh = recurrent_kernel.T``, ``b_ih = bias``, ``b_hh = 0``.
- GRU: Keras gates z, r, h become PyTorch's r, z, n (blocks reordered). ``reset_after=True``
  (bias (2, 3H)): row 0 is the input bias, row 1 the recurrent bias, exactly PyTorch's
  GRU. ``reset_after=False`` (bias (3H,)): Keras computes
  ``hh = tanh(x W_h + b_h + (r * h) U_h)``, which is the kernels' reset-before-product GRU
  with ``b_ih = bias`` and ``b_hh = 0``.
- SimpleRNN: ``h = act(x W + b + h U)``: ``w_ih = kernel.T``, ``w_hh = recurrent_kernel.T``.
- Dense: ``head_weight = kernel.T``; its output size must equal the number of input
  features, because the head predicts the next event.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from streamrnn.errors import ModelFileError

_CELLS = {"lstm": "lstm", "gru": "gru", "simple_rnn": "rnn"}
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}
_CLASS_OF = {"lstm": "LSTM", "gru": "GRU", "rnn": "SimpleRNN"}
# Layers without weights that do nothing at inference, so they may sit in the stack.
_PASS_THROUGH = {"input_layer", "dropout", "spatial_dropout1d", "gaussian_noise",
                 "gaussian_dropout", "alpha_dropout", "activity_regularization"}
_PASS_THROUGH_CLASSES = {"InputLayer", "Dropout", "SpatialDropout1D", "GaussianNoise",
                         "GaussianDropout", "AlphaDropout", "ActivityRegularization"}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_SUPPORTED = "streamrnn imports LSTM, GRU or SimpleRNN layers (one kind) followed by one Dense head"


@dataclass
class KerasLayer:
    """One layer's variables as found in the weights file."""

    key: str  # group key, e.g. "gru_1"
    index: int  # the number Keras appended (0 for the first of its class): model order
    kind: str  # "lstm", "gru", "rnn" or "dense"
    name: str  # the layer's own name, for messages
    arrays: list[np.ndarray]  # vars/0, vars/1, ... in order


@dataclass
class KerasConfig:
    """What a ``.keras`` archive's config says beyond the weights (None where unknown)."""

    nonlinearity: str | None = None
    reset_after: bool | None = None


def load_keras_weights(cls: type, path: Path, **options: Any):
    """Build a Model from a Keras 3 ``.weights.h5`` file or ``.keras`` archive.

    Parameters
    ----------
    cls : type
        The Model class (passed in so this module needs no import of it).
    path : Path
    **options
        Further Model fields (feature_names, scaler_mean, name, ...). ``reset_after`` is
        only needed for a GRU without bias, whose variant the weights cannot show;
        ``nonlinearity="relu"`` for a relu SimpleRNN saved as ``.weights.h5``.

    Returns
    -------
    Model

    Raises
    ------
    ModelFileError
        The file is missing or not Keras 3 weights, or holds layers streamrnn cannot run.
    """
    path = Path(path)
    try:
        with _open_weights(path) as (h5, config):
            found = _read_layers(h5)
        return _build_model(cls, path, found, config, options)
    except ModelFileError as exc:
        prefix = f"{path}: "
        raise ModelFileError(str(exc) if str(exc).startswith(prefix) else prefix + str(exc)) from None


# ------------------------------------------------------------------------ opening
@contextmanager
def _open_weights(path: Path) -> Iterator[tuple[Any, KerasConfig | None]]:
    """The HDF5 weights (and, for a .keras archive, its parsed config)."""
    head = _read_head(path)
    config = None
    if head[:2] == b"PK":
        source, config = _open_archive(path)
    elif head[:8] == _HDF5_MAGIC:
        source = str(path)
    else:
        raise ModelFileError("not a Keras weights file: neither HDF5 (.weights.h5) nor a .keras "
                             "archive; save the Keras model with model.save_weights('x.weights.h5')")
    try:
        h5 = h5py.File(source, "r")
    except OSError as exc:
        raise ModelFileError(f"cannot open the HDF5 weights ({exc}); the file is corrupt or "
                             f"truncated") from None
    try:
        yield h5, config
    except ModelFileError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        # h5py reports damaged files lazily, when a group or dataset is first read.
        raise ModelFileError(f"cannot read the HDF5 weights ({exc}); the file is corrupt or "
                             f"truncated") from None
    finally:
        h5.close()


def _read_head(path: Path) -> bytes:
    try:
        if path.is_dir():
            raise ModelFileError("is a directory, not a Keras weights file")
        with path.open("rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise ModelFileError("no such file") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read the file ({exc.strerror or exc})") from None
    if not head:
        raise ModelFileError("the file is empty")
    return head


def _open_archive(path: Path) -> tuple[io.BytesIO, KerasConfig]:
    """model.weights.h5 (in memory) and the checked config of a .keras archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "model.weights.h5" not in names or "config.json" not in names:
                raise ModelFileError("a zip archive without model.weights.h5 and config.json: not a "
                                     "Keras 3 .keras file (PyTorch checkpoints go through "
                                     "Model.from_torch)")
            weights = archive.read("model.weights.h5")
            config = json.loads(archive.read("config.json"))
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"cannot read the .keras archive ({exc}); it is corrupt or "
                             f"truncated") from None
    return io.BytesIO(weights), _check_config(config)


# ------------------------------------------------------------------------ reading
def _read_layers(h5: Any) -> list[KerasLayer]:
    """Every layer that has weights, in file order; pass-through layers are dropped."""
    if "layers" not in h5 or not isinstance(h5["layers"], h5py.Group):
        if "model_weights" in h5 or "layer_names" in h5.attrs:
            raise ModelFileError("a Keras 2 (tf.keras) HDF5 file; load the model in Keras 3 and "
                                 "save it with model.save_weights('x.weights.h5')")
        raise ModelFileError("no 'layers' group: not a Keras 3 weights file")
    found = []
    for key, group in h5["layers"].items():
        layer = _read_layer(key, group)
        if layer is not None:
            found.append(layer)
    return found


def _read_layer(key: str, group: Any) -> KerasLayer | None:
    base, index = _split_key(key)
    name = _layer_name(group, key)
    if base == "bidirectional":
        raise ModelFileError(f"layer {name!r} is Bidirectional: it reads the sequence backwards "
                             f"from its end, which a stream does not have yet")
    if base in _CELLS:
        return KerasLayer(key, index, _CELLS[base], name, _read_vars(group, "cell/vars", name))
    if base == "dense":
        return KerasLayer(key, index, "dense", name, _read_vars(group, "vars", name))
    if base == "time_distributed" and "layer/vars" in group:
        # TimeDistributed(Dense) is the Keras 2 idiom for a per-step head.
        return KerasLayer(key, index, "dense", name, _read_vars(group, "layer/vars", name))
    if base in _PASS_THROUGH and not _has_datasets(group):
        return None
    raise ModelFileError(f"unsupported layer {name!r} (stored as {key!r}); {_SUPPORTED}")


def _split_key(key: str) -> tuple[str, int]:
    """'gru_2' -> ('gru', 2); 'gru' -> ('gru', 0)."""
    match = re.fullmatch(r"(.*?)(?:_(\d+))?", key)
    return match.group(1), int(match.group(2) or 0)


def _layer_name(group: Any, key: str) -> str:
    """The name the user gave the layer (stored on its ``vars`` group), else the key."""
    name = group["vars"].attrs.get("name") if "vars" in group else None
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name if isinstance(name, str) and name else key


def _has_datasets(group: Any) -> bool:
    seen = []
    group.visititems(lambda _, obj: seen.append(1) if isinstance(obj, h5py.Dataset) else None)
    return bool(seen)


def _read_vars(group: Any, sub: str, name: str) -> list[np.ndarray]:
    """vars/0, vars/1, ... as float32 arrays, refusing anything but float datasets."""
    node = group.get(sub)
    if not isinstance(node, h5py.Group):
        raise ModelFileError(f"layer {name!r} has no {sub!r} group; not a Keras 3 weights layout")
    keys = sorted(node.keys(), key=lambda k: int(k) if k.isdigit() else -1)
    if [k for k in keys] != [str(i) for i in range(len(keys))]:
        raise ModelFileError(f"layer {name!r}: unexpected variables {keys} (expected 0, 1, ...)")
    arrays = []
    for k in keys:
        ds = node[k]
        if not isinstance(ds, h5py.Dataset) or ds.dtype.kind != "f":
            what = ds.dtype if isinstance(ds, h5py.Dataset) else "a group"
            raise ModelFileError(f"layer {name!r}: variable {k} is {what}, expected float weights")
        arrays.append(np.asarray(ds[()], dtype=np.float32))
    return arrays


# ------------------------------------------------------------------------ config
def _check_config(config: Any) -> KerasConfig:
    """Refuse what the kernels cannot compute; return the settings the weights do not show."""
    try:
        layers = config["config"]["layers"]
        entries = [(layer["class_name"], layer.get("config") or {}) for layer in layers]
    except (KeyError, TypeError, AttributeError):
        raise ModelFileError("config.json does not describe a Sequential or Functional model "
                             "with a list of layers") from None
    out = KerasConfig()
    seen_head = False
    for cls_name, cfg in entries:
        if cls_name in _PASS_THROUGH_CLASSES:
            continue
        if cls_name in ("LSTM", "GRU", "SimpleRNN"):
            if seen_head:
                raise ModelFileError(f"layer {cfg.get('name')!r} comes after the Dense head; {_SUPPORTED}")
            _check_recurrent_config(cls_name, cfg, out)
        elif cls_name == "Dense" or (cls_name == "TimeDistributed" and _wrapped_class(cfg) == "Dense"):
            inner = cfg if cls_name == "Dense" else cfg["layer"].get("config", {})
            _require(inner, "activation", ("linear", None), "the Dense head must be linear")
            seen_head = True
        elif cls_name == "Bidirectional":
            raise ModelFileError(f"layer {cfg.get('name')!r} is Bidirectional: it reads the sequence "
                                 f"backwards from its end, which a stream does not have yet")
        else:
            raise ModelFileError(f"unsupported layer {cfg.get('name')!r} ({cls_name}); {_SUPPORTED}")
    return out


def _check_recurrent_config(cls_name: str, cfg: dict, out: KerasConfig) -> None:
    name = cfg.get("name")
    if cfg.get("go_backwards"):
        raise ModelFileError(f"layer {name!r} has go_backwards=True; a stream only runs forwards")
    if cls_name == "SimpleRNN":
        _require(cfg, "activation", ("tanh", "relu"), "SimpleRNN runs with tanh or relu")
        out.nonlinearity = _activation_name(cfg.get("activation", "tanh"))
        return
    _require(cfg, "activation", ("tanh",), f"{cls_name} runs with activation='tanh'")
    _require(cfg, "recurrent_activation", ("sigmoid",),
             f"{cls_name} runs with recurrent_activation='sigmoid'")
    if cls_name == "GRU":
        ra = bool(cfg.get("reset_after", True))
        if out.reset_after is not None and out.reset_after != ra:
            raise ModelFileError("GRU layers mix reset_after=True and False; a model has one variant")
        out.reset_after = ra


def _require(cfg: dict, key: str, allowed: tuple, why: str) -> None:
    value = _activation_name(cfg.get(key, allowed[0]))
    if value not in allowed:
        raise ModelFileError(f"layer {cfg.get('name')!r} has {key}={value!r}; {why}")


def _activation_name(value: Any) -> Any:
    """Keras serialises built-in activations as a name, older versions as a small dict."""
    if isinstance(value, dict):
        inner = value.get("config")
        return inner if isinstance(inner, str) else value.get("class_name")
    return value


def _wrapped_class(cfg: dict) -> Any:
    inner = cfg.get("layer")
    return inner.get("class_name") if isinstance(inner, dict) else None


# ------------------------------------------------------------------------ converting
def _build_model(cls: type, path: Path, found: list[KerasLayer], config: KerasConfig | None,
                 options: dict[str, Any]):
    recurrent, head = _arrange(found)
    cell = recurrent[0].kind
    reset_after = _resolve_reset_after(recurrent, config, options.pop("reset_after", None))
    if cell == "rnn" and config is not None and config.nonlinearity:
        if options.get("nonlinearity", config.nonlinearity) != config.nonlinearity:
            raise ModelFileError(f"nonlinearity={options['nonlinearity']!r} contradicts the "
                                 f"archive's SimpleRNN activation {config.nonlinearity!r}")
        options["nonlinearity"] = config.nonlinearity
    layers, d_in = [], None
    for layer in recurrent:
        converted = _convert_recurrent(layer, d_in)
        layers.append(converted)
        d_in = converted["w_hh"].shape[1]
    head_weight, head_bias = _convert_head(head, d_in, layers[0]["w_ih"].shape[1])
    options.setdefault("training", {"imported_from": "keras", "source_file": path.name})
    return cls(cell=cell, layers=layers, head_weight=head_weight, head_bias=head_bias,
               reset_after=reset_after, **options)


def _arrange(found: list[KerasLayer]) -> tuple[list[KerasLayer], KerasLayer]:
    """Recurrent layers in model order and the one Dense head."""
    recurrent = sorted((layer for layer in found if layer.kind != "dense"), key=lambda layer: layer.index)
    heads = [layer for layer in found if layer.kind == "dense"]
    if not recurrent:
        raise ModelFileError(f"no LSTM, GRU or SimpleRNN layer found; {_SUPPORTED}")
    kinds = sorted({layer.kind for layer in recurrent})
    if len(kinds) > 1:
        mixed = " and ".join(_CLASS_OF[k] for k in kinds)
        raise ModelFileError(f"the model mixes {mixed} layers; a streamrnn model has one cell type")
    if len(heads) != 1:
        raise ModelFileError(f"expected exactly one Dense head after the recurrent layers, found "
                             f"{len(heads)}; {_SUPPORTED}")
    return recurrent, heads[0]


def _resolve_reset_after(recurrent: list[KerasLayer], config: KerasConfig | None,
                         requested: bool | None) -> bool:
    """GRU variant: from the bias shapes, else the archive's config, else the option."""
    if recurrent[0].kind != "gru":
        return True if requested is None else bool(requested)
    seen = {_gru_variant(layer) for layer in recurrent} - {None}
    if len(seen) > 1:
        raise ModelFileError("GRU layers mix reset_after=True and False; a model has one variant")
    known = seen.pop() if seen else (config.reset_after if config else None)
    if known is not None and requested is not None and bool(requested) != known:
        raise ModelFileError(f"reset_after={requested} contradicts the file, whose GRU has "
                             f"reset_after={known}")
    if known is None:
        known = True if requested is None else bool(requested)  # Keras's default
    return known


def _gru_variant(layer: KerasLayer) -> bool | None:
    """reset_after from the bias shape: (2, 3H) True, (3H,) False, no bias unknown."""
    if len(layer.arrays) < 3:
        return None
    return layer.arrays[2].ndim == 2


def _convert_recurrent(layer: KerasLayer, d_in: int | None) -> dict[str, np.ndarray]:
    """One Keras recurrent layer as PyTorch-layout w_ih, w_hh, b_ih, b_hh."""
    kernel, recurrent, bias = _split_vars(layer)
    g = _GATES[layer.kind]
    h = recurrent.shape[0] if recurrent.ndim == 2 else -1
    if recurrent.shape != (h, g * h) or h < 1:
        raise ModelFileError(f"layer {layer.name!r}: recurrent kernel has shape {recurrent.shape}, "
                             f"expected (H, {g}H) for a {_CLASS_OF[layer.kind]} layer")
    want_in = kernel.shape[0] if d_in is None and kernel.ndim == 2 else d_in
    if kernel.shape != (want_in, g * h):
        raise ModelFileError(f"layer {layer.name!r}: kernel has shape {kernel.shape}, expected "
                             f"({want_in}, {g * h}) — {want_in} inputs from "
                             f"{'the layer below' if d_in is not None else 'the data'} and {h} units")
    b_ih, b_hh = _split_bias(layer, bias, g * h)
    w_ih, w_hh = kernel.T, recurrent.T
    if layer.kind == "gru":
        w_ih, w_hh, b_ih, b_hh = (_zrh_to_rzn(a, h) for a in (w_ih, w_hh, b_ih, b_hh))
    return {"w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh}


def _split_vars(layer: KerasLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if len(layer.arrays) not in (2, 3):
        raise ModelFileError(f"layer {layer.name!r} has {len(layer.arrays)} variables; a Keras "
                             f"{_CLASS_OF[layer.kind]} has kernel, recurrent kernel and bias")
    bias = layer.arrays[2] if len(layer.arrays) == 3 else None
    return layer.arrays[0], layer.arrays[1], bias


def _split_bias(layer: KerasLayer, bias: np.ndarray | None, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(b_ih, b_hh): Keras adds its one bias to the input side, except GRU reset_after."""
    zeros = np.zeros(width, np.float32)
    if bias is None:  # use_bias=False
        return zeros, zeros.copy()
    if layer.kind == "gru" and bias.shape == (2, width):
        return bias[0], bias[1]
    if bias.shape != (width,):
        allowed = f"({width},) or (2, {width})" if layer.kind == "gru" else f"({width},)"
        raise ModelFileError(f"layer {layer.name!r}: bias has shape {bias.shape}, expected {allowed}")
    return bias, zeros


def _zrh_to_rzn(a: np.ndarray, h: int) -> np.ndarray:
    """Reorder GRU gate blocks along axis 0 from Keras (z, r, h) to PyTorch (r, z, n)."""
    return np.concatenate([a[h:2 * h], a[:h], a[2 * h:]], axis=0)


def _convert_head(head: KerasLayer, d_in: int, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    if len(head.arrays) not in (1, 2) or head.arrays[0].ndim != 2:
        raise ModelFileError(f"layer {head.name!r} is not a Dense layer with a 2-D kernel")
    kernel = head.arrays[0]
    bias = head.arrays[1] if len(head.arrays) == 2 else np.zeros(kernel.shape[1], np.float32)
    if kernel.shape[0] != d_in:
        raise ModelFileError(f"Dense head {head.name!r} takes {kernel.shape[0]} inputs but the last "
                             f"recurrent layer has {d_in} units")
    if kernel.shape[1] != n_features:
        raise ModelFileError(f"Dense head {head.name!r} has {kernel.shape[1]} outputs for "
                             f"{n_features} input features; streamrnn's head predicts the next "
                             f"event, so the two must match")
    if bias.shape != (kernel.shape[1],):
        raise ModelFileError(f"Dense head {head.name!r}: bias has shape {bias.shape}, expected "
                             f"({kernel.shape[1]},)")
    return kernel.T, bias
