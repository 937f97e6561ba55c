"""Inference writes nothing: no variable of the model changes outside training.

Every route that serves a model is run on a trained model holding every
stateful layer, and every variable (weights, state, seeds, the logged values'
accumulators, the optimizer's) is compared bit for bit before and after:
`predict`, `predict_on_batch`, calls with `training=False` and without
`training`, a `.keras` file loaded (here, and on the other backends through
`test_saved_models.py`), and on TensorFlow an exported serving function.
`evaluate` may add to the logged values' accumulators (as Keras metrics do)
but changes no weight, nor the weights a saved file holds.
"""

import keras
import numpy as np
import pytest

import keras_stateful
from backends_test import all_layers
from backends_test.helpers import BACKEND
from keras_stateful.testing import variables_snapshot


def trained(restart_threshold=None):
    """The every-layer model after one epoch of fit, logging its values."""
    model = all_layers.every_layer_model(vq_restart_threshold=restart_threshold)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x = all_layers.data(2)
    model.fit(
        x,
        all_layers.targets(len(x[0])),
        batch_size=all_layers.BATCH,
        validation_split=0.5,
        verbose=0,
        callbacks=[keras_stateful.LogLayerValues()],
    )
    return model, all_layers.data(2, seed=1)


def assert_unchanged(model, before, route):
    all_layers.assert_identical(variables_snapshot(model), before, route)


@pytest.mark.parametrize("restart_threshold", [None, 0.5], ids=["plain", "restarts"])
def test_no_inference_route_writes_a_variable(restart_threshold):
    model, x = trained(restart_threshold)
    before = variables_snapshot(model)
    logged = [
        v.path for layer in model.layers for v in getattr(layer, "logged_variables", [])
    ]
    assert len(logged) == 8 and set(logged) <= before.keys()
    routes = {
        "predict": lambda: model.predict(x, batch_size=all_layers.BATCH, verbose=0),
        "predict_on_batch": lambda: model.predict_on_batch(x),
        "training=False": lambda: model(x, training=False),
        "no training argument": lambda: model(x),
    }
    for route, run in routes.items():
        run()
        assert_unchanged(model, before, route)


def test_evaluate_changes_no_weight_and_logs_beside_them(tmp_path):
    model, x = trained()
    weights, saved_before = model.get_weights(), tmp_path / "before.keras"
    model.save(saved_before)
    before = variables_snapshot(model)
    logger = keras_stateful.LogLayerValues()
    model.evaluate(x, all_layers.targets(len(x[0])), verbose=0, callbacks=[logger])
    assert logger.evaluation_values["center_loss"] > 0
    after = variables_snapshot(model)
    changed = sorted(
        path for path in before if not np.array_equal(before[path], after[path])
    )
    logged = sorted(
        v.path for layer in model.layers for v in getattr(layer, "logged_variables", [])
    )
    assert changed and set(changed) <= set(logged), changed
    for new, old in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(new, old)
    model.save(tmp_path / "after.keras")
    reloaded = [
        keras.saving.load_model(p) for p in (saved_before, tmp_path / "after.keras")
    ]
    for new, old in zip(
        reloaded[1].get_weights(), reloaded[0].get_weights(), strict=True
    ):
        np.testing.assert_array_equal(new, old)


def test_a_loaded_model_predicts_without_writing(tmp_path):
    model, x = trained()
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    saved = all_layers.values(loaded.weights)
    before = variables_snapshot(loaded)
    loaded.predict(x, batch_size=all_layers.BATCH, verbose=0)
    loaded(x, training=False)
    assert_unchanged(loaded, before, "predict of a loaded model")
    all_layers.assert_identical(
        all_layers.values(model.weights), saved, "saved weights"
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf_saved_model export")
def test_exported_serving_function_writes_nothing(tmp_path):
    import tensorflow as tf

    model, x = trained()
    before = variables_snapshot(model)
    model.export(tmp_path / "served", format="tf_saved_model", verbose=False)
    assert_unchanged(model, before, "model.export")
    served = tf.saved_model.load(str(tmp_path / "served"))
    exported = {v.name: v.numpy().copy() for v in served.variables}
    assert exported, "the export holds no variables"
    outputs = [served.serve([tf.constant(a) for a in x]) for _ in range(3)]
    np.testing.assert_array_equal(outputs[0].numpy(), outputs[-1].numpy())
    for variable in served.variables:
        np.testing.assert_array_equal(variable.numpy(), exported[variable.name])
