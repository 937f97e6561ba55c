"""Shared fixtures: the suite runs unchanged under each KERAS_BACKEND."""

import keras
import numpy as np
import pytest


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
