"""Saved models load on every backend, from every backend and every version.

The fixtures (`backends_test/fixtures/<version>/<backend>/`, written by
`scripts/make_fixtures.py`) hold one small trained model per stateful layer,
saved by each backend. Each backend's test session loads all of them, so the
three sessions together check all six cross-backend pairs (train on JAX, serve
on TensorFlow or PyTorch, and so on), and every later version keeps loading
the files of earlier ones.
"""

import json
import pathlib

import keras
import numpy as np
import pytest

from backends_test import all_layers
from backends_test.helpers import BACKEND

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
SAVED = sorted(FIXTURES.glob("*/*/*.keras"))
BACKENDS = ("jax", "tensorflow", "torch")


def fixture_id(path):
    version, writer, name = path.parts[-3], path.parts[-2], path.stem
    return f"{version}-{writer}-to-{BACKEND}-{name}"


def expected_of(path):
    with np.load(path.with_suffix(".npz")) as stored:
        arrays = dict(stored)
    metadata = json.loads(str(arrays.pop("metadata")))

    def part(prefix):
        return {
            key[len(prefix) :]: value
            for key, value in arrays.items()
            if key.startswith(prefix)
        }

    return arrays, metadata, part("weights/"), part("optimizer/"), part("after_step/")


def version_key(name):
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def test_every_version_holds_every_layer_from_every_backend():
    versions = sorted(
        (p.name for p in FIXTURES.iterdir() if p.is_dir()), key=version_key
    )
    assert versions, "no fixtures: run scripts/make_fixtures.py on each backend"
    for version in versions:
        written = {
            backend: {p.stem for p in (FIXTURES / version / backend).glob("*.keras")}
            for backend in BACKENDS
        }
        assert all(written.values()), f"{version}: a backend wrote nothing: {written}"
        assert len({frozenset(names) for names in written.values()}) == 1, (
            f"{version}: the backends wrote different layers: {written}"
        )
        for path in (FIXTURES / version).glob("*/*.keras"):
            assert path.with_suffix(".npz").exists(), f"{path} has no .npz"
    # A layer added to the library gets a fixture in the newest version.
    newest = {p.stem for p in (FIXTURES / versions[-1] / BACKENDS[0]).glob("*.keras")}
    assert newest == {*all_layers.LAYERS, *all_layers.VARIANTS}, (
        "run `KERAS_BACKEND=<backend> PYTHONPATH=. python scripts/make_fixtures.py` "
        "for each backend"
    )


@pytest.mark.parametrize("path", SAVED, ids=fixture_id)
def test_saved_model_loads_with_identical_state_and_predictions(path):
    arrays, metadata, weights, optimizer, after_step = expected_of(path)
    assert metadata["backend"] == path.parts[-2]

    # A model compiled on PyTorch stores a torch-only optimizer class
    # (keras.src.backend.torch.optimizers.torch_sgd) that the other backends
    # cannot import without torch: load it uncompiled there, and check the
    # weights and state (the optimizer does not travel; docs/guarantees.md).
    foreign_torch = metadata["backend"] == "torch" and BACKEND != "torch"
    model = keras.saving.load_model(path, compile=not foreign_torch)

    # Every weight and every state variable, and the optimizer's variables,
    # bit for bit: dtype included, but for integers whose dtype is the
    # loading backend's: a seed kept as state (VectorQuantizerEMA's restart
    # seed, MemoryBank's sampler seed: keras.random's seed dtype, uint32 on
    # JAX, int64 on TensorFlow, int32 on PyTorch) and the optimizer's step
    # (int64 on TensorFlow, int32 elsewhere). Their values are kept.
    loaded = all_layers.values(model.weights)
    # 0.1.0 kept logged values (sums and counts) in weights; they load into
    # the accumulators beside the weights no more (docs/guarantees.md).
    logged = {
        v.path
        for layer in all_layers.stateful_layers(model)
        for v in layer.logged_variables
    }
    expected = {p: v for p, v in weights.items() if p not in logged}
    if not foreign_torch:
        loaded.update(all_layers.values(model.optimizer.variables))
        expected.update(optimizer)
    backend_dtyped = [
        p
        for p in expected
        if p.endswith(("/restart_seed", "/sampler_seed", "/iteration"))
    ]
    for variable_path in backend_dtyped:
        value, stored = loaded.pop(variable_path), expected.pop(variable_path)
        assert value.dtype.kind in "iu" and stored.dtype.kind in "iu"
        np.testing.assert_array_equal(value.astype("int64"), stored.astype("int64"))
    all_layers.assert_identical(loaded, expected, f"variables of {path.name}")

    # Served here, it predicts what it predicted where it was trained. Keras
    # saves `jit_compile` resolved (True when written on JAX), which would
    # make PyTorch `torch.compile` the model (a minute per model); serve it as
    # this backend's own default runs (docs/guarantees.md).
    model.jit_compile = BACKEND == "jax"
    probe = [arrays["probe_x"], arrays["probe_labels"]]
    before_predict = all_layers.values(model.variables)
    predictions = model.predict(probe, batch_size=all_layers.BATCH, verbose=0)
    np.testing.assert_allclose(predictions, arrays["predictions"], rtol=1e-6, atol=1e-6)
    # Predicting wrote nothing: every variable, weights and accumulators alike.
    all_layers.assert_identical(
        all_layers.values(model.variables), before_predict, f"after predict {path.name}"
    )

    # And it keeps training here as it would have there.
    model(probe, training=True)
    state = {}
    for layer in all_layers.stateful_layers(model):
        state.update(all_layers.values(layer.state_variables))
        assert layer.skipped_updates == 0
    assert sorted(state) == sorted(after_step)
    if "restart_seed" in " ".join(after_step) and metadata["backend"] != BACKEND:
        # Restarted codes are drawn by keras.random, whose streams differ
        # between backends: the same seed, another (equally valid) draw.
        after_step = {
            key: value
            for key, value in after_step.items()
            if key.endswith(("/counter", "/restart_seed"))
        }
    for variable_path, expected in after_step.items():
        assert np.all(np.isfinite(state[variable_path]))
        np.testing.assert_allclose(
            state[variable_path],
            expected,
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"{variable_path} after a training step",
        )
