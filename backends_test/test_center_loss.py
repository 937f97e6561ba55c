"""CenterLoss against a NumPy re-implementation of the Keras-2 example's rule.

The reference is the dense one-hot formula of handongfeng/MNIST-center-loss
(Wen et al. 2016, Eq. 4): delta = Y^T (Y C - X) / (1 + Y^T 1), C <- C - alpha * delta.
"""

import keras
import numpy as np
import pytest

import keras_stateful
from backends_test.helpers import jax_copies_of_state, value_of
from keras_stateful.layers import CenterLoss
from keras_stateful.testing import check_state_contract, state_snapshot

K, D = 6, 3


def numpy_center_step(centers, features, labels, alpha):
    one_hot = np.eye(len(centers))[labels]
    delta = one_hot.T @ (one_hot @ centers - features)
    delta /= (1 + one_hot.sum(0))[:, None]
    loss = 0.5 * ((features - centers[labels]) ** 2).sum(1).mean()
    return centers - alpha * delta, loss


def seeded_layer(**kwargs):
    return CenterLoss(
        K, centers_initializer=keras.initializers.RandomNormal(seed=3), **kwargs
    )


@pytest.mark.parametrize(
    "label_form", ["ids", "ids_column", "one_hot"], ids=lambda form: form
)
def test_matches_keras2_rule_over_steps(label_form, rng):
    layer = seeded_layer(alpha=0.3, loss_weight=2.0)
    # Duplicates in every batch, and classes 4, 5 never appear.
    batches = [
        (rng.normal(size=(10, D)).astype("float32"), rng.integers(0, 4, size=10))
        for _ in range(4)
    ]
    centers = None
    for features, labels in batches:
        as_given = {
            "ids": labels.astype("int32"),
            "ids_column": labels.astype("int64")[:, None],
            "one_hot": np.eye(K, dtype="float32")[labels],
        }[label_form]
        if centers is None:
            layer([features, as_given])
            centers = value_of(layer.centers).astype("float64")
        out = layer([features, as_given], training=True)
        centers, loss = numpy_center_step(centers, features, labels, 0.3)
        np.testing.assert_allclose(
            value_of(layer.centers), centers, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(layer.losses[0]), 2.0 * loss, rtol=1e-5
        )
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(out), features)
    assert np.array_equal(value_of(layer.centers)[4:], centers[4:])


def test_absent_classes_do_not_move(rng):
    layer = seeded_layer()
    features = rng.normal(size=(4, D)).astype("float32")
    labels = np.array([1, 1, 1, 1], "int32")
    layer([features, labels])
    before = value_of(layer.centers)
    layer([features, labels], training=True)
    after = value_of(layer.centers)
    assert np.array_equal(np.delete(after, 1, 0), np.delete(before, 1, 0))
    assert not np.array_equal(after[1], before[1])


def test_gradient_reaches_features_not_centers(rng):
    features = rng.normal(size=(8, D)).astype("float32")
    labels = rng.integers(0, K, size=(8,)).astype("int32")
    inputs = [keras.Input((D,)), keras.Input((), dtype="int32")]
    dense = keras.layers.Dense(D, name="dense")
    layer = seeded_layer(name="centers")
    model = keras.Model(inputs, layer([dense(inputs[0]), inputs[1]]))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=lambda y, p: 0.0 * p)
    kernel = value_of(dense.kernel)
    model.fit([features, labels], np.zeros((8, D)), batch_size=8, verbose=0)
    assert not np.allclose(value_of(dense.kernel), kernel), (
        "center loss trains features"
    )
    assert id(layer.centers) not in {id(v) for v in model.trainable_variables}


def test_out_of_range_label_is_an_eager_error(rng):
    layer = seeded_layer()
    features = rng.normal(size=(3, D)).astype("float32")
    with pytest.raises(ValueError, match=r"in \[0, 6\); received \[7, -1\]"):
        layer([features, np.array([0, 7, -1], "int32")], training=True)


def test_out_of_range_labels_in_compiled_fit_are_left_out_and_counted(rng):
    features = rng.normal(size=(6, D)).astype("float32")
    labels = np.array([0, 0, 9, 1, -3, 1], "int32")
    inputs = [keras.Input((D,)), keras.Input((), dtype="int32")]
    layer = seeded_layer(alpha=0.5, name="centers")
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer="sgd", loss=lambda y, p: 0.0 * p, jit_compile=True)
    layer([features[:1], labels[:1]])
    before = value_of(layer.centers).astype("float64")
    model.fit([features, labels], np.zeros((6, D)), batch_size=6, verbose=0)
    keep = (labels >= 0) & (labels < K)
    expected, _ = numpy_center_step(before, features[keep], labels[keep], 0.5)
    np.testing.assert_allclose(value_of(layer.centers), expected, rtol=1e-5, atol=1e-6)
    assert state_snapshot(layer)["out_of_range_labels"] == 2


def test_float_class_ids_are_refused_with_the_fix(rng):
    layer = seeded_layer()
    features = rng.normal(size=(3, D)).astype("float32")
    with pytest.raises(TypeError, match=r"integers; received dtype float32.*int32"):
        layer([features, np.array([0.0, 1.0, 2.0], "float32")])


def test_called_on_one_tensor_says_how_to_call(rng):
    with pytest.raises(ValueError, match=r"\[features, labels\]"):
        seeded_layer()(rng.normal(size=(3, D)).astype("float32"))


def test_state_contract_integer_labels(rng):
    features = rng.normal(size=(12, D)).astype("float32")
    labels = rng.integers(0, K, size=(12,)).astype("int32")
    check_state_contract(lambda: seeded_layer(alpha=0.5), [features, labels])


def test_state_contract_one_hot_labels(rng):
    features = rng.normal(size=(12, D)).astype("float32")
    labels = np.eye(K, dtype="float32")[rng.integers(0, K, size=12)]
    check_state_contract(
        lambda: seeded_layer(alpha=0.5), [features, labels], mixed_precision_policies=()
    )


def center_loss_model(num_classes=3):
    features = keras.Input((4,))
    labels = keras.Input((), dtype="int32")
    hidden = keras.layers.Dense(2, name="features")(features)
    outputs = CenterLoss(num_classes, loss_weight=0.5)([hidden, labels])
    model = keras.Model([features, labels], outputs)
    model.compile(optimizer="sgd")  # the center loss is the only loss
    return model


def test_loss_is_logged_under_the_layer_name_in_fit(rng):
    """With no other loss, `center_loss` must equal Keras's own `loss`."""
    x = rng.normal(size=(40, 4)).astype("float32")
    y = rng.integers(0, 3, 40).astype("int32")
    model = center_loss_model()
    history = model.fit(
        [x, y],
        epochs=2,
        batch_size=8,
        validation_split=0.2,
        verbose=0,
        callbacks=[keras_stateful.LogLayerValues()],
    ).history
    np.testing.assert_allclose(history["center_loss"], history["loss"], rtol=1e-5)
    np.testing.assert_allclose(
        history["val_center_loss"], history["val_loss"], rtol=1e-5
    )
    # The validation value is the loss of the validation split with the
    # final centers and features (evaluate updates nothing).
    layer = model.get_layer("center_loss")
    feats = np.asarray(
        keras.Model(model.inputs, model.get_layer("features").output).predict(
            [x[32:], y[32:]], verbose=0
        )
    )
    centers = value_of(layer.centers)
    expected = 0.5 * np.mean(0.5 * np.sum((feats - centers[y[32:]]) ** 2, axis=1))
    np.testing.assert_allclose(history["val_center_loss"][-1], expected, rtol=1e-5)


def test_loss_logged_at_epoch_end_only_and_in_evaluate(rng):
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, 16).astype("int32")
    model = center_loss_model()
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append("center_loss" in logs)

    logger = keras_stateful.LogLayerValues(every_batch=False)
    history = model.fit(
        [x, y], batch_size=8, verbose=0, callbacks=[logger, Spy()]
    ).history
    assert seen == [False, False]
    np.testing.assert_allclose(history["center_loss"], history["loss"], rtol=1e-5)
    loss = model.evaluate([x, y], verbose=0, callbacks=[logger])
    np.testing.assert_allclose(logger.evaluation_values["center_loss"], loss, rtol=1e-5)


def test_logging_never_touches_the_state(rng):
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.integers(0, 3, 8).astype("int32")
    layer = seeded_layer()
    layer([x, y], training=False)
    before = state_snapshot(layer)
    with keras_stateful.evaluation_logging():
        layer([x, y], training=False)
    assert layer.logged_values()["center_loss"] > 0
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, before[name])
    layer.reset_logged_values()
    assert np.isnan(layer.logged_values()["center_loss"])


def test_empty_batch_adds_zero_loss_and_moves_nothing(rng):
    layer = seeded_layer()
    layer([rng.normal(size=(2, D)).astype("float32"), np.array([0, 1])], training=False)
    before = state_snapshot(layer)
    empty = [np.zeros((0, D), "float32"), np.zeros((0,), "int32")]
    out = layer(empty, training=True)
    assert tuple(out.shape) == (0, D)
    assert [float(keras.ops.convert_to_numpy(loss)) for loss in layer.losses] == [0.0]
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="XLA's compiled step")
def test_jax_train_step_writes_the_center_rows_in_place(rng):
    # A training step reads the centers (loss and update) and writes some rows.
    # Unless every read is ordered before the write, XLA copies all K rows to
    # write them, every step: O(K * D) where the update is O(B log B + B * D).
    classes, dim, batch = 3000, 8, 16
    inputs = [keras.Input((dim,)), keras.Input((), dtype="int32")]
    hidden = keras.layers.Dense(dim)(inputs[0])
    hidden = CenterLoss(classes)([hidden, inputs[1]])
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    x = rng.normal(size=(batch, dim)).astype("float32")
    y = rng.integers(0, classes, batch).astype("int32")
    assert jax_copies_of_state(model, [x, y], (classes, dim)) == []
