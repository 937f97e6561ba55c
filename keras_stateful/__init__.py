"""keras_stateful: Keras 3 layers whose state is updated in training, not by gradients.

The base class `StatefulLayer` makes the update correct on JAX, TensorFlow and
PyTorch; `keras_stateful.layers` holds the layers built on it, and
`keras_stateful.testing.check_state_contract` checks any such layer.
"""

from keras_stateful import distributed, layers
from keras_stateful.accumulation import set_accumulation_steps
from keras_stateful.calibrate import calibrate
from keras_stateful.logged_values import (
    LogLayerValues,
    evaluation_logging,
    read_logged_values,
)
from keras_stateful.stateful_layer import StatefulLayer, find_stateful_layers

__version__ = "0.2.0"

__all__ = [
    "LogLayerValues",
    "StatefulLayer",
    "__version__",
    "calibrate",
    "distributed",
    "evaluation_logging",
    "find_stateful_layers",
    "layers",
    "read_logged_values",
    "set_accumulation_steps",
]
