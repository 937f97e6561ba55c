"""What `add_update` does in tf-keras 2.x, as docs/migrating-from-add_update.md says.

Runs only under KERAS_BACKEND=tensorflow with `tf_keras` importable (it is not in
the test extras: `pip install tf_keras==<your TensorFlow version>` to run it).
Verified with TensorFlow 2.21.0 and tf_keras 2.21.0.
"""

import numpy as np
import pytest

from backends_test.helpers import BACKEND

if BACKEND != "tensorflow":
    pytest.skip("tf_keras runs on TensorFlow only", allow_module_level=True)
tf_keras = pytest.importorskip(
    "tf_keras", reason="tf_keras is not installed (pip install tf_keras)"
)

FEATURES = np.random.default_rng(0).normal(size=(6, 2)).astype("float32")
ONE_HOT = np.eye(10, dtype="float32")[[0, 0, 1, 2, 2, 2]]


def keras2_center_loss_layer(update_form):
    """The guide's Keras-2 layer, with `add_update` called in `update_form`."""
    K = tf_keras.backend

    class CenterLossLayer(tf_keras.layers.Layer):
        def build(self, input_shape):
            self.centers = self.add_weight(
                name="centers", shape=(10, 2), initializer="uniform", trainable=False
            )
            super().build(input_shape)

        def call(self, x, mask=None):
            delta = K.dot(K.transpose(x[1]), K.dot(x[1], self.centers) - x[0])
            delta /= K.sum(K.transpose(x[1]), axis=1, keepdims=True) + 1
            new_centers = self.centers - 0.5 * delta
            if update_form == "pair with inputs":  # the Keras-2 line, unchanged
                self.add_update((self.centers, new_centers), x)
            elif update_form == "pair":
                self.add_update((self.centers, new_centers))
            elif update_form == "callable":
                self.add_update(lambda: self.centers.assign(new_centers))
            result = x[0] - K.dot(x[1], self.centers)
            return K.sum(result**2, axis=1, keepdims=True)

    return CenterLossLayer()


def model_with(layer):
    features, labels = tf_keras.Input((2,)), tf_keras.Input((10,))
    model = tf_keras.Model([features, labels], layer([features, labels]))
    model.compile("sgd", lambda y_true, y_pred: y_pred)
    return model


def centers_move(layer, run):
    before = layer.centers.numpy().copy()
    run()
    return not np.array_equal(layer.centers.numpy(), before)


def test_keras2_line_with_inputs_raises_when_the_model_is_built():
    layer = keras2_center_loss_layer("pair with inputs")
    with pytest.raises(TypeError, match="takes 2 positional arguments but 3"):
        model_with(layer)


def test_pair_without_inputs_is_silently_ignored():
    layer = keras2_center_loss_layer("pair")
    model = model_with(layer)
    fit = lambda: model.fit([FEATURES, ONE_HOT], np.zeros(6), verbose=0)  # noqa: E731
    assert not centers_move(layer, fit)


def test_callable_updates_in_fit_and_also_in_predict_and_evaluate():
    layer = keras2_center_loss_layer("callable")
    model = model_with(layer)
    inputs, targets = [FEATURES, ONE_HOT], np.zeros(6)
    assert centers_move(layer, lambda: model.fit(inputs, targets, verbose=0))
    assert centers_move(layer, lambda: model.predict(inputs, verbose=0))
    assert centers_move(layer, lambda: model.evaluate(inputs, targets, verbose=0))


def test_callable_does_not_update_when_the_layer_is_not_trainable():
    layer = keras2_center_loss_layer("callable")
    model = model_with(layer)
    layer.trainable = False
    model.compile("sgd", lambda y_true, y_pred: y_pred)
    fit = lambda: model.fit([FEATURES, ONE_HOT], np.zeros(6), verbose=0)  # noqa: E731
    assert not centers_move(layer, fit)
