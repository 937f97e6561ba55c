"""Small helpers shared by the test files (fixtures live in conftest.py)."""

import keras
import numpy as np

BACKEND = keras.backend.backend()


def value_of(variable):
    """A variable's value as a NumPy copy."""
    return np.array(keras.ops.convert_to_numpy(variable))
