"""The stateful layers of keras_stateful."""

from keras_stateful.layers.center_loss import CenterLoss
from keras_stateful.layers.moving_average import MovingAverage

__all__ = ["CenterLoss", "MovingAverage"]
