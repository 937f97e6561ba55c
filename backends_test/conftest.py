"""Shared fixtures: the suite runs unchanged under each KERAS_BACKEND."""

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from float32, a cleared session and a fixed seed.

    Without `free_memory`'s `gc.collect()`: it takes about a third of a
    second once TensorFlow or PyTorch is loaded, longer than most tests, and
    Python collects anyway. Tests that count objects or memory collect
    themselves.
    """
    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def state_of(layer):
    """The layer's state variables as NumPy arrays, by name."""
    return {
        v.name: np.array(keras.ops.convert_to_numpy(v)) for v in layer.state_variables
    }


def value_of(variable):
    return np.array(keras.ops.convert_to_numpy(variable))
