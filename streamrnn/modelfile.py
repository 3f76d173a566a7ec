"""Model files: safetensors holding the weights, JSON metadata under one header key.

A model file is data only. Reading one never unpickles, imports or evaluates anything:
the 8-byte header length and the JSON header are checked here first, then the tensor
bytes are decoded by ``safetensors`` (a Rust parser). Every way a file can be wrong ends
in one :class:`~streamrnn.errors.ModelFileError` that names the file, says what is wrong
and, where there is one, what to do about it.

Layout::

    u64 little-endian N | N bytes of JSON header | tensor data
    header = {"__metadata__": {"streamrnn": "<JSON of Model.metadata()>"},
              "<tensor name>": {"dtype": "F32", "shape": [...], "data_offsets": [b, e]}, ...}
"""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from streamrnn.errors import ModelFileError, StreamrnnError

METADATA_KEY = "streamrnn"
FORMAT_NAME = "streamrnn-model"
SUPPORTED_FORMAT_VERSION = 1  # keep equal to streamrnn.model.FORMAT_VERSION

_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_SNIFF_BYTES = 4096
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8,
             "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}
# Weights run in float32; the scaler is applied in float64 (either is accepted there).
_WEIGHT_DTYPES = ("F32",)
_SCALER_DTYPES = ("F64", "F32")

_PICKLE_HINT = ("this is a Python pickle; streamrnn never loads pickles — re-export the weights "
                "with Model.from_torch(...).save()")
_ZIP_HINT = ("this is a zip archive (a PyTorch .pt/.pth checkpoint or a Keras .keras file), not a "
             "streamrnn model; streamrnn never loads pickled checkpoints — re-export the weights "
             "with Model.from_torch(...).save() or Model.from_keras(...).save()")
_HDF5_HINT = ("this is an HDF5 file (Keras weights?), not a streamrnn model; import it with "
              "Model.from_keras(path) and save that")
_NOT_MODEL_HINT = ("write model files with Model.save() or `streamrnn train`")

# Types of the metadata fields Model.metadata() writes; checked so a malformed header is
# reported here rather than surfacing as a stray TypeError while the Model is built.
_REQUIRED_FIELDS = ("format_version", "cell", "hidden")
_FIELD_CHECKS: dict[str, tuple[str, Any]] = {
    "cell": ("a string", lambda v: isinstance(v, str)),
    "n_features": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "hidden": ("a non-empty list of positive integers",
               lambda v: isinstance(v, list) and v and all(_is_int(h) and h > 0 for h in v)),
    "reset_after": ("true or false", lambda v: isinstance(v, bool)),
    "peephole": ("true or false", lambda v: isinstance(v, bool)),
    "nonlinearity": ("a string", lambda v: isinstance(v, str)),
    "head": ("a string", lambda v: isinstance(v, str)),
    "feature_names": ("a list of strings",
                      lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v)),
    "thresholds": ("an object of numbers (or lists/objects of numbers and strings)",
                   lambda v: isinstance(v, dict) and _is_plain_data(v)),
    "stream_scaler_streams": ("null or a list of strings",
                              lambda v: v is None or (isinstance(v, list)
                                                      and all(isinstance(s, str) for s in v))),
    "name": ("a string", lambda v: isinstance(v, str)),
    "version": ("a string", lambda v: isinstance(v, str)),
    "created": ("a string", lambda v: isinstance(v, str)),
    "training": ("an object", lambda v: isinstance(v, dict)),
    "streamrnn_version": ("a string", lambda v: isinstance(v, str)),
}


# ---------------------------------------------------------------------------- writing
def write_model_file(path: Path, tensors: dict[str, np.ndarray], metadata: dict) -> Path:
    """Write tensors and metadata as a safetensors model file, atomically.

    The bytes go to a temporary file in the target directory, are fsync'ed and then
    renamed over ``path``, so a reader sees the old file or the new one, never half of one.

    Parameters
    ----------
    path : Path
        Destination; missing parent directories are created.
    tensors : dict of str to ndarray
        Stored with their own dtype (float32 weights, float64 scaler), bit for bit.
    metadata : dict
        JSON-serialisable; numpy scalars and arrays are converted to plain numbers/lists.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    StreamrnnError
        If the metadata is not JSON-serialisable or a tensor is not a numeric array.
    """
    path = Path(path)
    payload = _serialise(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, payload)
    return path


def _serialise(tensors: dict[str, np.ndarray], metadata: dict) -> bytes:
    try:
        meta_json = json.dumps(metadata, sort_keys=True, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise StreamrnnError(f"model metadata is not JSON-serialisable: {exc}") from None
    arrays = {}
    for name, arr in tensors.items():
        a = np.asarray(arr)
        if a.dtype.kind not in "fiub":
            raise StreamrnnError(f"tensor {name!r} has dtype {a.dtype}; model tensors are numeric arrays")
        # safetensors is little-endian and needs C-contiguous data; neither changes a value.
        arrays[name] = np.ascontiguousarray(a, a.dtype.newbyteorder("<"))
    return _st_save(arrays, metadata={METADATA_KEY: meta_json})


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} object {obj!r} is not JSON-serialisable")


def _atomic_write(path: Path, payload: bytes) -> None:
    # os.open with 0o666 lets the umask decide the mode, as a plain open() would;
    # tempfile's 0o600 would leave model files unreadable to the serving user.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; not every platform can open a directory, so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- reading
def read_model_file(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read a model file written by :func:`write_model_file`.

    Parameters
    ----------
    path : Path

    Returns
    -------
    tensors : dict of str to ndarray
        Writable arrays with the stored dtypes.
    metadata : dict
        The decoded streamrnn metadata.

    Raises
    ------
    ModelFileError
        For anything that is not a complete, well-formed streamrnn model file of a
        supported format version: missing, empty, truncated, foreign (pickle, zip,
        HDF5, JSON, ...), malformed header, wrong dtypes.
    """
    path = Path(path)
    try:
        data = _read_checked(path)
        header = _parse_header(data)
        metadata = _decode_metadata(header)
        _check_tensor_entries(header, len(data) - 8 - _header_length(data))
        tensors = _decode_tensors(data)
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    return tensors, metadata


def _read_checked(path: Path) -> bytes:
    """The file's bytes, read whole only once its first bytes look like safetensors.

    Sniffing first means pointing the loader at a 10 GB Parquet file costs one small read.
    """
    try:
        with path.open("rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ModelFileError("not a regular file")
            head = fh.read(_SNIFF_BYTES)
            problem = _foreign_reason(head, info.st_size)
            if problem:
                raise ModelFileError(problem)
            return head + fh.read()
    except FileNotFoundError:
        raise ModelFileError("no such model file") from None
    except IsADirectoryError:
        raise ModelFileError("is a directory, not a model file") from None
    except PermissionError:
        raise ModelFileError("permission denied reading the model file") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read the model file ({exc.strerror or exc})") from None


def _foreign_reason(head: bytes, size: int) -> str | None:
    """None when the file starts like safetensors; else what it is instead."""
    if size == 0:
        return "the file is empty, not a model file"
    n = _header_length(head) if len(head) >= 8 else None
    if n is not None and 2 <= n <= size - 8 and head[8:9] == b"{":
        return None
    return _describe_foreign(head, size, n)


def _parse_header(data: bytes) -> dict:
    """The JSON header as a dict (the length prefix was checked by :func:`_foreign_reason`)."""
    n = _header_length(data)
    if n > _MAX_HEADER:
        raise ModelFileError(f"safetensors header of {n} bytes is larger than any model file needs")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"the safetensors header is not valid JSON ({exc}); the file is "
                             f"corrupt or truncated") from None
    if not isinstance(header, dict):
        raise ModelFileError("the safetensors header is not a JSON object; the file is corrupt")
    return header


def _describe_foreign(head: bytes, size: int, n: int | None) -> str:
    """Name what a file is, from its first bytes, when it is not a safetensors file."""
    if head[:1] == b"\x80" and head[1:2] and head[1] <= 5:
        return _PICKLE_HINT
    if head[:2] == b"PK":
        return _ZIP_HINT
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return _HDF5_HINT
    if head[:64].lstrip()[:1] in (b"{", b"["):
        return f"this is a JSON file, not a streamrnn model file; {_NOT_MODEL_HINT}"
    if n is None:
        return f"only {size} bytes, too short for a model file (truncated?)"
    if size - 8 < n <= _MAX_HEADER and head[8:9] in (b"{", b""):
        return (f"truncated: the safetensors header says {n} bytes but only {size - 8} follow; "
                f"the file was cut short — copy or write it again")
    if _is_text(head[:512]):
        return f"this is a text file (CSV?), not a streamrnn model file; {_NOT_MODEL_HINT}"
    if n > size - 8:
        return (f"not a safetensors model file: its first 8 bytes give a header length of {n} "
                f"bytes, larger than the {size}-byte file; {_NOT_MODEL_HINT}")
    return f"not a safetensors model file (no JSON header); {_NOT_MODEL_HINT}"


def _is_text(chunk: bytes) -> bool:
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def _decode_metadata(header: dict) -> dict:
    extra = header.get("__metadata__")
    if not isinstance(extra, dict) or METADATA_KEY not in extra:
        found = sorted(extra) if isinstance(extra, dict) else []
        what = f"metadata keys {found}" if found else "no metadata"
        raise ModelFileError(f"a safetensors file but not a streamrnn model ({what}, no "
                             f"{METADATA_KEY!r} entry); {_NOT_MODEL_HINT}")
    try:
        meta = json.loads(extra[METADATA_KEY])
    except (TypeError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"the streamrnn metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"the {METADATA_KEY!r} metadata does not describe a "
                             f"{FORMAT_NAME!r}; not a streamrnn model")
    _check_format_version(meta.get("format_version"))
    _check_fields(meta)
    return meta


def _check_format_version(version: Any) -> None:
    if not _is_int(version) or version < 1:
        raise ModelFileError(f"format_version {version!r} is not a positive integer")
    if version > SUPPORTED_FORMAT_VERSION:
        raise ModelFileError(f"written in model format version {version} by a newer streamrnn; this "
                             f"streamrnn reads up to version {SUPPORTED_FORMAT_VERSION} — upgrade "
                             f"streamrnn to load it")


def _check_fields(meta: dict) -> None:
    for key in _REQUIRED_FIELDS:
        if key not in meta:
            raise ModelFileError(f"metadata field {key!r} is missing")
    for key, (what, ok) in _FIELD_CHECKS.items():
        if key in meta and not ok(meta[key]):
            raise ModelFileError(f"metadata field {key!r} must be {what}, not {meta[key]!r:.80}")


def _header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def _check_tensor_entries(header: dict, data_size: int) -> None:
    """Dtype, shape and byte range of every tensor, before any byte is decoded."""
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise ModelFileError(f"tensor {name!r} has a malformed header entry; the file is corrupt")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        _check_dtype(name, dtype)
        if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise ModelFileError(f"tensor {name!r} has a malformed shape or byte range; the file is corrupt")
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != math.prod(shape) * _ITEMSIZE.get(dtype, 0):
            raise ModelFileError(f"tensor {name!r}: byte range {offsets} does not fit shape {shape} "
                                 f"of {dtype}; the file is corrupt")
        if end > data_size:
            raise ModelFileError(f"truncated: tensor {name!r} ends at byte {end} of the data section "
                                 f"but the file holds only {data_size}; the file was cut short — "
                                 f"copy or write it again")


def _check_dtype(name: str, dtype: Any) -> None:
    allowed = _SCALER_DTYPES if str(name).startswith("scaler.") else _WEIGHT_DTYPES
    if dtype not in allowed:
        want = " or ".join(_NUMPY_NAME[d] for d in allowed)
        raise ModelFileError(f"tensor {name!r} has dtype {dtype}; streamrnn stores it as {want}")


_NUMPY_NAME = {"F32": "float32", "F64": "float64"}


def _decode_tensors(data: bytes) -> dict[str, np.ndarray]:
    try:
        raw = _st_load(data)
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise ModelFileError(_explain_safetensors_error(exc)) from None
    # Own, writable copies: safetensors hands out read-only views of ``data``.
    return {name: np.array(arr, copy=True) for name, arr in raw.items()}


def _explain_safetensors_error(exc: Exception) -> str:
    text = str(exc)
    if "not fully covered" in text or "out of bounds" in text.lower() or "invalid offset" in text.lower():
        return f"truncated or corrupt tensor data ({text}); write or copy the file again"
    return f"not a valid safetensors file ({text})"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_plain_data(v: Any, depth: int = 0) -> bool:
    """Numbers, strings, booleans, null, and lists/objects of them (calibration results)."""
    if depth > 8:
        return False
    if v is None or isinstance(v, (str, bool, int, float)):
        return True
    if isinstance(v, list):
        return all(_is_plain_data(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_plain_data(x, depth + 1) for k, x in v.items())
    return False
