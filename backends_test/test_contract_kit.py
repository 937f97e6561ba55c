"""The contract kit passes for good layers and catches broken ones."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_stateful
from backends_test.helpers import BACKEND
from backends_test.user_layers import Keras2StyleCenters, ScaledByRunningMean
from keras_stateful.testing import check_state_contract


def test_user_layer_reading_state_in_differentiable_ops_passes(rng):
    x = rng.normal(size=(8, 4)).astype("float32")
    check_state_contract(lambda: ScaledByRunningMean(momentum=0.5), x)


def test_keras2_style_add_update_layer_passes(rng):
    features = rng.normal(size=(12, 2)).astype("float32")
    labels = rng.integers(0, 3, size=(12,)).astype("int32")
    check_state_contract(lambda: Keras2StyleCenters(num_classes=3), [features, labels])


# ---- broken layers: the kit must say so --------------------------------------


class WithTotal(keras_stateful.StatefulLayer):
    """One state, `total`, of the input's last dimension."""

    def build(self, input_shape):
        self.total = self.add_state("total", (input_shape[-1],))


@keras.saving.register_keras_serializable(package="backends_test")
class UpdatesInInference(WithTotal):
    """Commits with training=True always: updates under predict too."""

    def call(self, inputs, training=None):
        new = self.total + ops.sum(ops.cast(inputs, "float32"), axis=0)
        self.commit_state((self.total, new), training=True)
        return inputs


@keras.saving.register_keras_serializable(package="backends_test")
class PythonSideStep(WithTotal):
    """Keeps its step count in a Python attribute: right eagerly, wrong in fit.

    A compiled step is traced once (and the functional model calls `call`
    once more to build), so the Python counter does not follow the steps.
    """

    python_steps = 0

    def call(self, inputs, training=None):
        self.python_steps += 1
        new = self.total + float(self.python_steps)
        self.commit_state((self.total, new), training=training)
        return inputs


@keras.saving.register_keras_serializable(package="backends_test")
class NeverUpdates(WithTotal):
    def call(self, inputs, training=None):
        return inputs


@keras.saving.register_keras_serializable(package="backends_test")
class IgnoresFreeze(WithTotal):
    """Assigns directly, bypassing commit_state's gate on freeze/trainable."""

    def call(self, inputs, training=None):
        if training:
            self.total.assign(self.total + ops.sum(ops.cast(inputs, "float32"), axis=0))
        return inputs


@keras.saving.register_keras_serializable(package="backends_test")
class RandomUnseededState(keras_stateful.StatefulLayer):
    """reset_state() cannot restore an unseeded random initial state."""

    def build(self, input_shape):
        self.total = self.add_state(
            "total", (input_shape[-1],), initializer="random_normal"
        )

    def call(self, inputs, training=None):
        new = self.total + ops.sum(ops.cast(inputs, "float32"), axis=0)
        self.commit_state((self.total, new), training=training)
        return inputs


@pytest.mark.parametrize(
    ("layer_class", "message"),
    [
        (UpdatesInInference, "training=False"),
        (PythonSideStep, "contract broken"),
        (NeverUpdates, "unchanged"),
        (IgnoresFreeze, "frozen"),
        (RandomUnseededState, "reset_state"),
    ],
)
def test_kit_catches_broken_layer(layer_class, message, rng):
    x = rng.normal(size=(6, 3)).astype("float32")
    with pytest.raises(AssertionError, match=message):
        check_state_contract(layer_class, x, mixed_precision_policies=())


def test_kit_rejects_plain_keras_layer(rng):
    with pytest.raises(AssertionError, match="StatefulLayer"):
        check_state_contract(
            lambda: keras.layers.Dense(2), rng.normal(size=(4, 3)).astype("float32")
        )


def test_kit_rejects_odd_batch(rng):
    with pytest.raises(ValueError, match="even"):
        check_state_contract(
            keras_stateful.layers.MovingAverage, np.ones((3, 2), "float32")
        )


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile is torch's jit_compile")
def test_kit_under_torch_compile(rng):
    x = rng.normal(size=(8, 4)).astype("float32")
    check_state_contract(
        lambda: keras_stateful.layers.MovingAverage(0.9),
        x,
        jit_compile_modes=(True,),
        mixed_precision_policies=(),
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA on TensorFlow")
def test_kit_under_tensorflow_xla(rng):
    x = rng.normal(size=(8, 4)).astype("float32")
    check_state_contract(
        lambda: ScaledByRunningMean(momentum=0.5),
        x,
        jit_compile_modes=(True,),
        mixed_precision_policies=(),
    )
