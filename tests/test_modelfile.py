"""Model files: bit-exact round trips, and one clear ModelFileError for every bad file."""

from __future__ import annotations

import json
import os
import pickle
import stat
import struct
import tempfile
from functools import cache
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

from streamrnn import Model, ModelFileError, StreamrnnError
from streamrnn.model import FORMAT_VERSION
from streamrnn.modelfile import SUPPORTED_FORMAT_VERSION, read_model_file, write_model_file

VARIANTS = {
    "rnn-tanh-1": dict(cell="rnn", hidden=[3]),
    "rnn-relu-2": dict(cell="rnn", hidden=[3, 2], nonlinearity="relu"),
    "lstm-1": dict(cell="lstm", hidden=[4]),
    "lstm-peephole-3": dict(cell="lstm", hidden=[4, 3, 2], peephole=True),
    "gru-reset-after-2": dict(cell="gru", hidden=[3, 4], reset_after=True),
    "gru-reset-before-3": dict(cell="gru", hidden=[2, 3, 4], reset_after=False),
}


def make_model(cell: str = "gru", hidden=(3,), **options) -> Model:
    """A small model with every piece of metadata a trained one carries."""
    return Model.random(
        cell=cell, n_features=2, hidden=list(hidden), seed=7,
        feature_names=["cpu", "latency_ms"],
        scaler_mean=np.array([0.1, 250.0]), scaler_scale=np.array([1 / 3, 12.5]),
        thresholds={"alert": 4.25, "clear": 2.0}, name="checkout", version="3",
        training={"epochs": 5, "loss": [0.5, 0.125], "split": {"train": 0.7, "valid": 0.15}},
        **options)


@cache
def valid_file_bytes() -> bytes:
    """The bytes of a small valid model file, for the corruption tests."""
    with tempfile.TemporaryDirectory() as tmp:
        return make_model("lstm", [3]).save(Path(tmp) / "m.safetensors").read_bytes()


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bit pattern, so -0.0, NaN payloads and subnormals compare exactly."""
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def replace_metadata(data: bytes, change) -> bytes:
    """Re-encode ``data`` with its streamrnn metadata passed through ``change``."""
    n = header_length(data)
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["streamrnn"])
    change(meta)
    header["__metadata__"]["streamrnn"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def assert_load_fails(path: Path, *fragments: str) -> ModelFileError:
    with pytest.raises(ModelFileError) as info:
        Model.load(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


# ------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_load_every_variant_round_trips_bit_exact(tmp_path, variant):
    model = make_model(**VARIANTS[variant])
    path = model.save(tmp_path / "m.safetensors")
    loaded = Model.load(path)
    assert loaded.metadata() == model.metadata()
    original, restored = model.tensors(), loaded.tensors()
    assert sorted(original) == sorted(restored)
    for name, arr in original.items():
        assert restored[name].dtype == arr.dtype, name
        assert restored[name].shape == arr.shape, name
        assert np.array_equal(bits(restored[name]), bits(arr)), name


def test_save_load_metadata_fields_survive_unchanged(tmp_path):
    model = make_model("gru", [3], reset_after=False)
    loaded = Model.load(model.save(tmp_path / "m.safetensors"))
    assert loaded.feature_names == ["cpu", "latency_ms"]
    assert loaded.thresholds == {"alert": 4.25, "clear": 2.0}
    assert loaded.training == {"epochs": 5, "loss": [0.5, 0.125], "split": {"train": 0.7, "valid": 0.15}}
    assert (loaded.name, loaded.version, loaded.created) == (model.name, model.version, model.created)
    assert loaded.reset_after is False and loaded.cell == "gru"


def test_read_model_file_special_floats_round_trip_bit_exact(tmp_path):
    special = np.array([0.0, -0.0, 1e-45, -1e-40, np.finfo(np.float32).max, np.finfo(np.float32).tiny,
                        np.pi], np.float32)
    scaler = np.array([1e-310, -0.0, 1 / 3], np.float64)
    path = write_model_file(tmp_path / "m.safetensors", {"layers.0.w": special, "scaler.mean": scaler},
                            {"format": "streamrnn-model", "format_version": 1, "cell": "rnn", "hidden": [1]})
    tensors, meta = read_model_file(path)
    assert tensors["layers.0.w"].dtype == np.float32 and tensors["scaler.mean"].dtype == np.float64
    assert np.array_equal(bits(tensors["layers.0.w"]), bits(special))
    assert np.array_equal(bits(tensors["scaler.mean"]), bits(scaler))
    assert meta["hidden"] == [1]


def test_read_model_file_returns_writable_arrays(tmp_path):
    tensors, _ = read_model_file(make_model().save(tmp_path / "m.safetensors"))
    assert all(arr.flags.writeable and arr.flags.owndata for arr in tensors.values())


def test_write_model_file_numpy_scalars_in_metadata_become_json_numbers(tmp_path):
    meta = {"format": "streamrnn-model", "format_version": 1, "cell": "rnn", "hidden": [1],
            "thresholds": {"alert": np.float32(2.5)}, "training": {"epochs": np.int64(3),
                                                                  "loss": np.array([0.5, 0.25])}}
    _, back = read_model_file(write_model_file(tmp_path / "m.safetensors", {}, meta))
    assert back["thresholds"] == {"alert": 2.5}
    assert back["training"] == {"epochs": 3, "loss": [0.5, 0.25]}


def test_write_model_file_unserialisable_metadata_raises_streamrnn_error(tmp_path):
    with pytest.raises(StreamrnnError, match="not JSON-serialisable"):
        write_model_file(tmp_path / "m.safetensors", {}, {"training": {"callback": object()}})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ atomic writes
def test_save_existing_file_is_replaced_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "m.safetensors"
    make_model("rnn", [2]).save(path)
    make_model("gru", [3]).save(path)
    assert Model.load(path).cell == "gru"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_failed_rename_keeps_old_file_and_removes_temporary(tmp_path, monkeypatch):
    path = make_model("rnn", [2]).save(tmp_path / "m.safetensors")
    before = path.read_bytes()

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        make_model("gru", [3]).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_file_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = make_model().save(tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_save_missing_parent_directory_is_created(tmp_path):
    path = make_model().save(tmp_path / "models" / "v1" / "m.safetensors")
    assert Model.load(path).cell == "gru"


# ------------------------------------------------------------------------ not a model file
def test_load_missing_file_raises_model_file_error(tmp_path):
    assert_load_fails(tmp_path / "nope.safetensors", "no such model file")


def test_load_directory_raises_model_file_error(tmp_path):
    assert_load_fails(tmp_path, "is a directory")


def test_load_fifo_raises_model_file_error_without_blocking(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # a writer end, so opening to read does not block
    try:
        assert_load_fails(path, "not a regular file")
    finally:
        os.close(fd)


def test_load_empty_file_raises_model_file_error(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"")
    assert_load_fails(path, "empty")


@pytest.mark.parametrize("cut", [1, 7, 8, 9, 100, -1, -5, -200])
def test_load_truncated_file_raises_model_file_error_saying_truncated(tmp_path, cut):
    data = valid_file_bytes()
    path = tmp_path / "m.safetensors"
    path.write_bytes(data[:cut])
    error = assert_load_fails(path)
    assert "truncated" in str(error) or "too short" in str(error)


def test_load_random_bytes_raises_model_file_error(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_load_fails(path, "not a safetensors model file")


def test_load_csv_file_raises_model_file_error_naming_text(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("ts,stream,value\n2024-01-01T00:00:00Z,web-1,0.5\n" * 20)
    assert_load_fails(path, "text file")


def test_load_json_file_raises_model_file_error_naming_json(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(make_model().metadata()))
    assert_load_fails(path, "JSON file")


def test_load_hdf5_file_raises_model_file_error_pointing_to_from_keras(tmp_path):
    path = tmp_path / "m.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    assert_load_fails(path, "HDF5", "Model.from_keras")


def test_load_header_length_beyond_file_raises_model_file_error(tmp_path):
    data = valid_file_bytes()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    assert_load_fails(path, "larger than")


class _TouchOnUnpickle:
    """Unpickling this calls open(marker, 'w'): proof that a loader ran pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_load_pickle_with_payload_is_rejected_without_running_it(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "m.safetensors"
    path.write_bytes(pickle.dumps({"w": _TouchOnUnpickle(marker)}, protocol=protocol))
    assert_load_fails(path, "this is a Python pickle; streamrnn never loads pickles",
                      "Model.from_torch(...).save()")
    assert not marker.exists()


def test_load_torch_zip_checkpoint_raises_model_file_error(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weight_ih_l0": torch.zeros(3, 2)}, path)
    assert_load_fails(path, "zip archive", "Model.from_torch")


def test_load_legacy_torch_checkpoint_raises_pickle_error(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weight_ih_l0": torch.zeros(3, 2)}, path, _use_new_zipfile_serialization=False)
    assert_load_fails(path, "Python pickle")


# ------------------------------------------------------------------------ safetensors, not ours
def test_load_safetensors_without_metadata_says_not_a_streamrnn_model(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_save({"weight": np.zeros((2, 2), np.float32)}))
    assert_load_fails(path, "not a streamrnn model", "no metadata")


def test_load_safetensors_with_foreign_metadata_says_not_a_streamrnn_model(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_save({"weight": np.zeros((2, 2), np.float32)}, metadata={"format": "pt"}))
    assert_load_fails(path, "not a streamrnn model", "'format'")


def test_load_other_format_name_says_not_a_streamrnn_model(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(replace_metadata(valid_file_bytes(), lambda m: m.update(format="other")))
    assert_load_fails(path, "not a streamrnn model")


def test_load_newer_format_version_says_upgrade(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(replace_metadata(valid_file_bytes(), lambda m: m.update(format_version=2)))
    assert_load_fails(path, "format version 2", "newer streamrnn", "upgrade")


def test_reader_supported_version_equals_version_model_writes():
    assert SUPPORTED_FORMAT_VERSION == FORMAT_VERSION == make_model().metadata()["format_version"]


def test_load_metadata_not_json_raises_model_file_error(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_save({"w": np.zeros(1, np.float32)}, metadata={"streamrnn": "{not json"}))
    assert_load_fails(path, "not valid JSON")


@pytest.mark.parametrize("field, value, expected", [
    ("hidden", "abc", "'hidden' must be a non-empty list of positive integers"),
    ("hidden", [0], "'hidden' must be"),
    ("reset_after", "false", "'reset_after' must be true or false"),
    ("thresholds", ["ab"], "'thresholds' must be an object of numbers"),
    ("feature_names", "ab", "'feature_names' must be a list of strings"),
    ("format_version", "1", "format_version '1' is not a positive integer"),
])
def test_load_metadata_field_of_wrong_type_raises_model_file_error(tmp_path, field, value, expected):
    path = tmp_path / "m.safetensors"
    path.write_bytes(replace_metadata(valid_file_bytes(), lambda m: m.update({field: value})))
    assert_load_fails(path, expected)


def test_load_metadata_missing_cell_raises_model_file_error(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(replace_metadata(valid_file_bytes(), lambda m: m.pop("cell")))
    assert_load_fails(path, "'cell' is missing")


# ------------------------------------------------------------------------ inconsistent tensors
def write_with(path: Path, change) -> Path:
    """A file from a valid model whose tensors were passed through ``change``."""
    model = make_model("lstm", [3])
    tensors = model.tensors()
    change(tensors)
    return write_model_file(path, tensors, model.metadata())


def test_load_wrong_weight_shape_names_file_and_weight(tmp_path):
    path = write_with(tmp_path / "m.safetensors",
                      lambda t: t.update({"layers.0.w_hh": np.zeros((12, 4), np.float32)}))
    assert_load_fails(path, "layer 0", "shape")


def test_load_nan_weight_names_file_and_weight(tmp_path):
    def poison(t):
        t["layers.0.w_ih"] = t["layers.0.w_ih"].copy()
        t["layers.0.w_ih"][1, 0] = np.nan

    assert_load_fails(write_with(tmp_path / "m.safetensors", poison), "layers.0.w_ih", "NaN")


def test_load_infinite_head_weight_names_file_and_weight(tmp_path):
    path = write_with(tmp_path / "m.safetensors",
                      lambda t: t.update({"head.bias": np.array([np.inf, 0], np.float32)}))
    assert_load_fails(path, "head.bias", "infinite")


def test_load_integer_weights_raises_model_file_error_naming_dtype(tmp_path):
    path = write_with(tmp_path / "m.safetensors",
                      lambda t: t.update({"head.bias": np.array([1, 2], np.int64)}))
    assert_load_fails(path, "'head.bias'", "I64", "float32")


def test_load_float64_weights_raises_model_file_error(tmp_path):
    path = write_with(tmp_path / "m.safetensors",
                      lambda t: t.update({"layers.0.b_ih": t["layers.0.b_ih"].astype(np.float64)}))
    assert_load_fails(path, "'layers.0.b_ih'", "F64")


def test_load_missing_tensor_raises_model_file_error(tmp_path):
    assert_load_fails(write_with(tmp_path / "m.safetensors", lambda t: t.pop("head.weight")),
                      "head.weight")


def test_load_unexpected_layer_tensor_raises_model_file_error(tmp_path):
    path = write_with(tmp_path / "m.safetensors",
                      lambda t: t.update({"layers.0.extra": np.zeros(2, np.float32)}))
    assert_load_fails(path, "unexpected weights ['extra']")


def test_load_unexpected_top_level_tensor_raises_model_file_error(tmp_path):
    path = write_with(tmp_path / "m.safetensors",
                      lambda t: t.update({"optimizer.m": np.zeros(2, np.float32)}))
    assert_load_fails(path, "unexpected tensors ['optimizer.m']")


# ------------------------------------------------------------------------ fuzzing
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def load_or_model_file_error(path: Path) -> None:
    """Loading either succeeds with a valid model or raises ModelFileError; nothing else."""
    try:
        Model.load(path)
    except ModelFileError:
        pass


@_FUZZ
@given(cut=st.integers(min_value=0, max_value=len(valid_file_bytes()) - 1))
def test_load_file_cut_at_any_byte_raises_model_file_error(tmp_path, cut):
    path = tmp_path / "m.safetensors"
    path.write_bytes(valid_file_bytes()[:cut])
    with pytest.raises(ModelFileError):
        Model.load(path)


@_FUZZ
@given(data=st.data())
def test_load_header_with_flipped_bytes_loads_or_raises_model_file_error(tmp_path, data):
    raw = bytearray(valid_file_bytes())
    end = 8 + header_length(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, end - 1))] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(raw))
    load_or_model_file_error(path)


@_FUZZ
@given(data=st.data())
def test_load_file_with_flipped_bytes_anywhere_loads_or_raises_model_file_error(tmp_path, data):
    raw = bytearray(valid_file_bytes())
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(raw))
    load_or_model_file_error(path)


@_FUZZ
@given(blob=st.binary(max_size=256))
def test_load_arbitrary_bytes_raises_model_file_error(tmp_path, blob):
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ModelFileError):
        Model.load(path)


def test_load_never_unpickles_even_when_asked_through_bytesio(tmp_path):
    # A pickle stream hidden after a plausible safetensors length prefix is still only bytes.
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_TouchOnUnpickle(marker), protocol=2)
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(payload)) + payload)
    assert_load_fails(path)
    assert not marker.exists()
