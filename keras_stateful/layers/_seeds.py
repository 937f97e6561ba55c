"""Random draws from a seed kept as state (saved, and advanced only by commits)."""

from __future__ import annotations

import keras

from keras_stateful.types import Tensor


class SeedValue(keras.random.SeedGenerator):
    """A seed given as a value: `keras.random` draws from it, nothing advances."""

    def __init__(self, value: Tensor) -> None:  # no state variable of its own
        self.value = value

    def next(self, ordered: bool = True) -> Tensor:
        return self.value
