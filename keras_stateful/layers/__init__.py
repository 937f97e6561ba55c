"""The stateful layers of keras_stateful."""

from keras_stateful.layers.moving_average import MovingAverage

__all__ = ["MovingAverage"]
