"""MovingAverage against a NumPy re-implementation of the Haiku/Sonnet EMA."""

import keras
import numpy as np
import pytest

from backends_test.helpers import value_of
from keras_stateful.layers import MovingAverage
from keras_stateful.testing import check_state_contract, state_snapshot


def numpy_ema(batches, momentum, zero_debias):
    """Haiku `ExponentialMovingAverage` (zero_debias) or the plain Keras EMA."""
    hidden = np.zeros(batches[0].shape[1:], "float64")
    average = np.zeros_like(hidden)
    for counter, batch in enumerate(batches, start=1):
        hidden = momentum * hidden + (1 - momentum) * batch.mean(axis=0)
        average = hidden / (1 - momentum**counter) if zero_debias else hidden
    return average


@pytest.mark.parametrize("zero_debias", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.99])
def test_matches_numpy_reference(zero_debias, momentum, rng):
    batches = [rng.normal(loc=3.0, size=(5, 2, 3)).astype("float32") for _ in range(6)]
    layer = MovingAverage(momentum, zero_debias=zero_debias)
    for batch in batches:
        layer(batch, training=True)
    np.testing.assert_allclose(
        value_of(layer.average),
        numpy_ema(batches, momentum, zero_debias),
        rtol=2e-6,
        atol=1e-6,
    )
    assert state_snapshot(layer)["counter"] == len(batches)


def test_first_debiased_average_is_the_batch_mean(rng):
    batch = rng.normal(size=(8, 4)).astype("float32")
    layer = MovingAverage(0.9, zero_debias=True)
    layer(batch, training=True)
    np.testing.assert_allclose(value_of(layer.average), batch.mean(0), rtol=1e-6)


def test_returns_its_input_unchanged(rng):
    batch = rng.normal(size=(4, 3)).astype("float32")
    out = MovingAverage()(batch, training=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(out), batch)


def test_inference_does_not_update(rng):
    layer = MovingAverage(0.5)
    layer(rng.normal(size=(4, 3)).astype("float32"), training=False)
    assert not value_of(layer.average).any() and state_snapshot(layer)["counter"] == 0


def test_bad_momentum_says_which_convention():
    with pytest.raises(ValueError, match=r"momentum=1\.5.*0\.99"):
        MovingAverage(1.5)


def test_unknown_feature_dims_are_refused():
    with pytest.raises(ValueError, match=r"received input shape \(None, None\)"):
        MovingAverage().build((None, None))


@pytest.mark.parametrize("zero_debias", [False, True])
def test_state_contract(zero_debias, rng):
    x = rng.normal(size=(8, 2, 3)).astype("float32")
    check_state_contract(lambda: MovingAverage(0.9, zero_debias=zero_debias), x)
