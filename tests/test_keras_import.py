"""Keras 3 import: against Keras itself, and against a NumPy transcription of its equations.

The h5py-built files mirror the Keras 3 ``.weights.h5`` layout exactly (a test below checks
that against a file Keras wrote), so the NumPy-reference tests pin the conversion without
Keras; the Keras tests then check the whole path, ``.keras`` archives included.
"""

from __future__ import annotations

import os

# Must precede the keras import; tensorflow and jax are not installed.
os.environ["KERAS_BACKEND"] = "torch"

from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from streamrnn import Model, ModelFileError  # noqa: E402

# Keras's torch backend trips a numpy 2 deprecation on every predict; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

RNG = np.random.default_rng(11)
X = RNG.normal(size=(2, 6, 3)).astype(np.float32)  # (B, T, D): two short sequences, 3 features
TOL = 1e-5


# ------------------------------------------------------------------------ NumPy reference
def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def keras_lstm(x, kernel, recurrent, bias):
    """Keras LSTMCell: gates i, f, c, o along the last axis of kernel (D, 4H)."""
    hsz = recurrent.shape[0]
    h, c, out = np.zeros(hsz), np.zeros(hsz), []
    for xt in x:
        z = xt @ kernel + h @ recurrent + bias
        i, f = sigmoid(z[:hsz]), sigmoid(z[hsz:2 * hsz])
        g, o = np.tanh(z[2 * hsz:3 * hsz]), sigmoid(z[3 * hsz:])
        c = f * c + i * g
        h = o * np.tanh(c)
        out.append(h)
    return np.array(out)


def keras_gru(x, kernel, recurrent, bias, reset_after):
    """Keras GRUCell: gates z, r, h; bias (2, 3H) when reset_after else (3H,)."""
    hsz = recurrent.shape[0]
    b_in, b_rec = (bias[0], bias[1]) if reset_after else (bias, None)
    h, out = np.zeros(hsz), []
    for xt in x:
        mx = xt @ kernel + b_in
        x_z, x_r, x_h = mx[:hsz], mx[hsz:2 * hsz], mx[2 * hsz:]
        if reset_after:
            inner = h @ recurrent + b_rec
            z, r = sigmoid(x_z + inner[:hsz]), sigmoid(x_r + inner[hsz:2 * hsz])
            hh = np.tanh(x_h + r * inner[2 * hsz:])
        else:
            inner = h @ recurrent[:, :2 * hsz]
            z, r = sigmoid(x_z + inner[:hsz]), sigmoid(x_r + inner[hsz:])
            hh = np.tanh(x_h + (r * h) @ recurrent[:, 2 * hsz:])
        h = z * h + (1 - z) * hh
        out.append(h)
    return np.array(out)


def keras_simple_rnn(x, kernel, recurrent, bias, activation=np.tanh):
    h, out = np.zeros(recurrent.shape[0]), []
    for xt in x:
        h = activation(xt @ kernel + bias + h @ recurrent)
        out.append(h)
    return np.array(out)


def reference_predict(x, cell, layers, dense, **kw):
    """Stacked Keras layers then the Dense head, for every sequence in x (B, T, D)."""
    step = {"lstm": keras_lstm, "gru": keras_gru, "simple_rnn": keras_simple_rnn}[cell]
    results = []
    for seq in x.astype(np.float64):
        h = seq
        for arrays in layers:
            h = step(h, *[a.astype(np.float64) for a in arrays], **kw)
        results.append(h @ dense[0] + dense[1])
    return np.array(results)


# ------------------------------------------------------------------------ Keras 3 layout by hand
def random_layers(cell, sizes, n_features, reset_after=True, bias=True):
    """Keras-shaped variables (kernel, recurrent kernel[, bias]) per layer and a Dense head."""
    gates = {"lstm": 4, "gru": 3, "simple_rnn": 1}[cell]
    layers, d_in = [], n_features
    for hsz in sizes:
        arrays = [RNG.normal(scale=0.5, size=(d_in, gates * hsz)),
                  RNG.normal(scale=0.5, size=(hsz, gates * hsz))]
        if bias:
            shape = (2, gates * hsz) if cell == "gru" and reset_after else (gates * hsz,)
            arrays.append(RNG.normal(scale=0.5, size=shape))
        layers.append([a.astype(np.float32) for a in arrays])
        d_in = hsz
    dense = [RNG.normal(scale=0.5, size=(d_in, n_features)).astype(np.float32),
             RNG.normal(scale=0.5, size=n_features).astype(np.float32)]
    return layers, dense


def write_keras_layout(path: Path, cell: str, layers, dense, extra=None) -> Path:
    """Write a ``.weights.h5`` exactly as Keras 3 lays out a Sequential model.

    ``extra`` maps further group keys to (variable group path, arrays) for odd files.
    """
    with h5py.File(path, "w") as f:
        f.create_group("vars").attrs["name"] = "sequential"
        for i, arrays in enumerate(layers):
            key = cell if i == 0 else f"{cell}_{i}"
            _layer_group(f, key, "cell/vars", arrays, name=key, cell_name=f"{cell}_cell")
        _layer_group(f, "dense", "vars", dense, name="dense")
        f.create_group("layers/dropout/vars").attrs["name"] = "dropout"  # weightless: skipped
        opt = f.create_group("optimizer/vars")
        opt.attrs["name"] = "adam"
        opt.create_dataset("0", data=np.int64(3))
        for key, (sub, arrays) in (extra or {}).items():
            _layer_group(f, key, sub, arrays, name=key)
    return path


def _layer_group(f, key, sub, arrays, name, cell_name=None):
    group = f.require_group(f"layers/{key}")
    group.require_group("vars").attrs["name"] = name
    target = group.require_group(sub)
    if cell_name:
        target.attrs["name"] = cell_name
    for i, a in enumerate(arrays):
        target.create_dataset(str(i), data=a)


def import_hand_written(tmp_path, cell, sizes, reset_after=True, bias=True, **options):
    layers, dense = random_layers(cell, sizes, X.shape[-1], reset_after, bias)
    path = write_keras_layout(tmp_path / "m.weights.h5", cell, layers, dense)
    return Model.from_keras(path, **options), layers, dense


# ------------------------------------------------------------------------ against the equations
def test_import_lstm_two_layers_matches_numpy_keras_equations(tmp_path):
    model, layers, dense = import_hand_written(tmp_path, "lstm", [4, 5])
    assert (model.cell, model.hidden) == ("lstm", [4, 5])
    np.testing.assert_allclose(model.predict(X), reference_predict(X, "lstm", layers, dense), atol=TOL)


def test_import_gru_reset_after_true_matches_numpy_keras_equations(tmp_path):
    model, layers, dense = import_hand_written(tmp_path, "gru", [4, 5], reset_after=True)
    assert model.reset_after is True
    expected = reference_predict(X, "gru", layers, dense, reset_after=True)
    np.testing.assert_allclose(model.predict(X), expected, atol=TOL)


def test_import_gru_reset_after_false_matches_numpy_keras_equations(tmp_path):
    model, layers, dense = import_hand_written(tmp_path, "gru", [4, 5], reset_after=False)
    assert model.reset_after is False
    expected = reference_predict(X, "gru", layers, dense, reset_after=False)
    np.testing.assert_allclose(model.predict(X), expected, atol=TOL)


def test_import_simple_rnn_matches_numpy_keras_equations(tmp_path):
    model, layers, dense = import_hand_written(tmp_path, "simple_rnn", [4])
    assert model.cell == "rnn"
    np.testing.assert_allclose(model.predict(X), reference_predict(X, "simple_rnn", layers, dense), atol=TOL)


def test_import_relu_simple_rnn_with_nonlinearity_option_matches_equations(tmp_path):
    model, layers, dense = import_hand_written(tmp_path, "simple_rnn", [4], nonlinearity="relu")
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    np.testing.assert_allclose(model.predict(X), reference_predict(X, "simple_rnn", layers, dense,
                                                                   activation=relu), atol=TOL)


@pytest.mark.parametrize("reset_after", [True, False])
def test_import_gru_without_bias_takes_reset_after_option(tmp_path, reset_after):
    model, layers, dense = import_hand_written(tmp_path, "gru", [4], bias=False, reset_after=reset_after)
    assert model.reset_after is True  # Keras's default when the file cannot tell
    model = Model.from_keras(tmp_path / "m.weights.h5", reset_after=reset_after)
    hsz = 4
    zero_bias = np.zeros((2, 3 * hsz) if reset_after else 3 * hsz, np.float32)
    expected = reference_predict(X, "gru", [layers[0] + [zero_bias]], dense, reset_after=reset_after)
    np.testing.assert_allclose(model.predict(X), expected, atol=TOL)


def test_import_more_than_ten_layers_keeps_model_order(tmp_path):
    # Keys gru, gru_1, ..., gru_10 sort as text with gru_10 before gru_2; model order is numeric.
    sizes = list(range(2, 13))
    model, _, _ = import_hand_written(tmp_path, "gru", sizes)
    assert model.hidden == sizes


def test_import_records_keras_source_in_training_metadata(tmp_path):
    model, _, _ = import_hand_written(tmp_path, "lstm", [3], feature_names=["a", "b", "c"])
    assert model.training == {"imported_from": "keras", "source_file": "m.weights.h5"}
    assert model.feature_names == ["a", "b", "c"]


def test_import_then_save_load_round_trips(tmp_path):
    model, _, _ = import_hand_written(tmp_path, "gru", [3], reset_after=False)
    loaded = Model.load(model.save(tmp_path / "m.safetensors"))
    assert loaded.reset_after is False
    for name, arr in model.tensors().items():
        assert np.array_equal(loaded.tensors()[name], arr), name


# ------------------------------------------------------------------------ files it must refuse
def refuse(path: Path, *fragments: str) -> None:
    with pytest.raises(ModelFileError) as info:
        Model.from_keras(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_import_missing_file_raises_model_file_error(tmp_path):
    refuse(tmp_path / "none.weights.h5", "no such file")


def test_import_empty_file_raises_model_file_error(tmp_path):
    path = tmp_path / "m.weights.h5"
    path.write_bytes(b"")
    refuse(path, "empty")


def test_import_csv_file_raises_model_file_error(tmp_path):
    path = tmp_path / "m.weights.h5"
    path.write_text("a,b\n1,2\n")
    refuse(path, "not a Keras weights file")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_import_truncated_file_raises_model_file_error(tmp_path, fraction):
    layers, dense = random_layers("lstm", [3], 3)
    data = write_keras_layout(tmp_path / "full.weights.h5", "lstm", layers, dense).read_bytes()
    path = tmp_path / "cut.weights.h5"
    path.write_bytes(data[:int(len(data) * fraction)])
    refuse(path, "corrupt or truncated")


def test_import_torch_checkpoint_raises_model_file_error(tmp_path):
    import torch

    path = tmp_path / "model.pt"
    torch.save({"weight_ih_l0": torch.zeros(3, 2)}, path)
    refuse(path, "a zip archive without model.weights.h5", "Model.from_torch")
    assert "cannot read" not in str(pytest.raises(ModelFileError, Model.from_keras, path).value)


def test_import_keras2_file_raises_model_file_error_saying_resave(tmp_path):
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"lstm"]
        f.create_dataset("lstm/lstm/lstm_cell/kernel:0", data=np.zeros((3, 8), np.float32))
    refuse(path, "Keras 2", "save_weights")


def test_import_mixed_lstm_and_gru_raises_model_file_error(tmp_path):
    layers, dense = random_layers("lstm", [3], 3)
    gru, _ = random_layers("gru", [3], 3)
    path = write_keras_layout(tmp_path / "m.weights.h5", "lstm", layers, dense,
                              extra={"gru": ("cell/vars", gru[0])})
    refuse(path, "mixes GRU and LSTM")


def test_import_bidirectional_raises_model_file_error(tmp_path):
    layers, dense = random_layers("lstm", [3], 3)
    path = write_keras_layout(tmp_path / "m.weights.h5", "lstm", layers, dense,
                              extra={"bidirectional": ("forward_layer/cell/vars", layers[0])})
    refuse(path, "Bidirectional")


def test_import_unsupported_layer_raises_model_file_error(tmp_path):
    layers, dense = random_layers("lstm", [3], 3)
    conv = [np.zeros((3, 3, 4), np.float32), np.zeros(4, np.float32)]
    path = write_keras_layout(tmp_path / "m.weights.h5", "lstm", layers, dense,
                              extra={"conv1d": ("vars", conv)})
    refuse(path, "unsupported layer 'conv1d'")


def test_import_head_output_size_not_feature_count_raises_model_file_error(tmp_path):
    layers, dense = random_layers("gru", [3], 3)
    dense = [dense[0][:, :2], dense[1][:2]]
    refuse(write_keras_layout(tmp_path / "m.weights.h5", "gru", layers, dense),
           "2 outputs for 3 input features")


def test_import_two_dense_layers_raises_model_file_error(tmp_path):
    layers, dense = random_layers("gru", [3], 3)
    path = write_keras_layout(tmp_path / "m.weights.h5", "gru", layers, dense,
                              extra={"dense_1": ("vars", dense)})
    refuse(path, "exactly one Dense head", "found 2")


def test_import_stacked_layer_size_mismatch_raises_model_file_error(tmp_path):
    layers, dense = random_layers("lstm", [3, 4], 2)
    layers[1][0] = layers[1][0][:2]  # second layer expects 2 inputs, the first gives 3
    refuse(write_keras_layout(tmp_path / "m.weights.h5", "lstm", layers, dense),
           "layer 'lstm_1'", "kernel has shape (2, 16)")


def test_import_gru_bias_of_wrong_shape_raises_model_file_error(tmp_path):
    layers, dense = random_layers("gru", [3], 2)
    layers[0][2] = np.zeros(5, np.float32)
    refuse(write_keras_layout(tmp_path / "m.weights.h5", "gru", layers, dense), "bias has shape (5,)")


def test_import_integer_weights_raises_model_file_error(tmp_path):
    layers, dense = random_layers("gru", [3], 2)
    layers[0][0] = layers[0][0].astype(np.int32)
    refuse(write_keras_layout(tmp_path / "m.weights.h5", "gru", layers, dense), "expected float weights")


def test_import_nan_weight_raises_model_file_error(tmp_path):
    layers, dense = random_layers("lstm", [3], 2)
    layers[0][1][0, 0] = np.nan
    refuse(write_keras_layout(tmp_path / "m.weights.h5", "lstm", layers, dense), "NaN")


def test_import_reset_after_option_contradicting_bias_raises_model_file_error(tmp_path):
    layers, dense = random_layers("gru", [3], 2, reset_after=True)
    path = write_keras_layout(tmp_path / "m.weights.h5", "gru", layers, dense)
    with pytest.raises(ModelFileError, match="contradicts"):
        Model.from_keras(path, reset_after=False)


# ------------------------------------------------------------------------ against Keras itself
def build_keras(cell: str, sizes, reset_after=True, functional=False, **cell_options):
    """A Keras next-step model with random weights, biases included, so every block matters."""
    layer_cls = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU,
                 "simple_rnn": keras.layers.SimpleRNN}[cell]
    extra = {"reset_after": reset_after} if cell == "gru" else {}
    recurrent = [layer_cls(h, return_sequences=True, **extra, **cell_options) for h in sizes]
    inputs = keras.Input((None, X.shape[-1]))
    if functional:
        h = inputs
        for layer in recurrent:
            h = layer(h)
        model = keras.Model(inputs, keras.layers.Dense(X.shape[-1], name="head")(h))
    else:
        model = keras.Sequential([inputs, *recurrent, keras.layers.Dropout(0.2),
                                  keras.layers.Dense(X.shape[-1])])
    rng = np.random.default_rng(5)
    for weight in model.weights:
        weight.assign(rng.normal(scale=0.5, size=weight.shape).astype(np.float32))
    return model


KERAS_CASES = {
    "lstm-2": dict(cell="lstm", sizes=[4, 5]),
    "gru-reset-after-2": dict(cell="gru", sizes=[4, 5], reset_after=True),
    "gru-reset-before-2": dict(cell="gru", sizes=[4, 5], reset_after=False),
    "simple-rnn-1": dict(cell="simple_rnn", sizes=[4]),
    "lstm-functional-1": dict(cell="lstm", sizes=[4], functional=True),
}


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
@pytest.mark.parametrize("case", sorted(KERAS_CASES))
def test_import_keras_model_matches_keras_predict(tmp_path, case, suffix):
    kmodel = build_keras(**KERAS_CASES[case])
    path = tmp_path / f"m{suffix}"
    kmodel.save_weights(path) if suffix == ".weights.h5" else kmodel.save(path)
    expected = kmodel.predict(X, verbose=0)
    np.testing.assert_allclose(Model.from_keras(path).predict(X), expected, atol=TOL)


def test_import_keras_relu_simple_rnn_archive_sets_nonlinearity(tmp_path):
    kmodel = build_keras("simple_rnn", [4], activation="relu")
    kmodel.save(tmp_path / "m.keras")
    model = Model.from_keras(tmp_path / "m.keras")
    assert model.nonlinearity == "relu"
    np.testing.assert_allclose(model.predict(X), kmodel.predict(X, verbose=0), atol=TOL)


@pytest.mark.parametrize("option, expected", [
    ({"activation": "relu"}, "activation='relu'"),
    ({"recurrent_activation": "hard_sigmoid"}, "recurrent_activation='hard_sigmoid'"),
    ({"go_backwards": True}, "go_backwards=True"),
])
def test_import_keras_archive_with_other_activations_raises_model_file_error(tmp_path, option, expected):
    build_keras("lstm", [3], **option).save(tmp_path / "m.keras")
    refuse(tmp_path / "m.keras", expected)


def test_import_keras_relu_dense_head_raises_model_file_error(tmp_path):
    model = keras.Sequential([keras.Input((None, 3)), keras.layers.GRU(3, return_sequences=True),
                              keras.layers.Dense(3, activation="relu")])
    model.save(tmp_path / "m.keras")
    refuse(tmp_path / "m.keras", "must be linear")


def test_import_keras_bidirectional_raises_model_file_error(tmp_path):
    model = keras.Sequential([keras.Input((None, 3)),
                              keras.layers.Bidirectional(keras.layers.LSTM(2, return_sequences=True)),
                              keras.layers.Dense(3)])
    model.save_weights(tmp_path / "m.weights.h5")
    refuse(tmp_path / "m.weights.h5", "Bidirectional")


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_import_truncated_keras_archive_raises_model_file_error(tmp_path, fraction):
    build_keras("gru", [3]).save(tmp_path / "full.keras")
    data = (tmp_path / "full.keras").read_bytes()
    path = tmp_path / "cut.keras"
    path.write_bytes(data[:int(len(data) * fraction)])
    refuse(path, "corrupt or truncated")


def test_hand_written_layout_equals_the_layout_keras_writes(tmp_path):
    kmodel = build_keras("gru", [4, 5])
    kmodel.compile(optimizer="adam", loss="mse")
    kmodel.fit(X, X, epochs=1, verbose=0)  # so the optimizer's variables are in the file too
    kmodel.save_weights(tmp_path / "keras.weights.h5")
    layers, dense = random_layers("gru", [4, 5], X.shape[-1])
    write_keras_layout(tmp_path / "ours.weights.h5", "gru", layers, dense)
    keras_tree, our_tree = _tree(tmp_path / "keras.weights.h5"), _tree(tmp_path / "ours.weights.h5")
    model_part = {k: v for k, v in keras_tree.items() if not k.startswith("optimizer")}
    assert {k: v for k, v in our_tree.items() if not k.startswith("optimizer")} == model_part


def _tree(path: Path) -> dict[str, object]:
    """Every dataset's shape and every group's attribute names, by path.

    Attribute values are left out: Keras names layers from a session-wide counter.
    """
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(
            name, obj.shape if isinstance(obj, h5py.Dataset) else sorted(obj.attrs)))
    return out
