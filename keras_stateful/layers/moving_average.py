"""`MovingAverage`: an exponential moving average of the input over the batch."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_stateful import distributed
from keras_stateful.layers import _checks
from keras_stateful.layers._moments import ema
from keras_stateful.stateful_layer import StatefulLayer, next_count
from keras_stateful.types import Tensor


@keras.saving.register_keras_serializable(package="keras_stateful")
class MovingAverage(StatefulLayer):
    """Exponential moving average of the input's batch mean; returns the input.

    In training, with `m = momentum` and `x̄` the mean of the batch over axis
    0 (computed in float32):

    - `counter = counter + 1` (int32, stops at 2**31 - 1)
    - without zero-debiasing: `average = m * average + (1 - m) * x̄`
      (`average` starts at zeros)
    - with `zero_debias=True` (Haiku/Sonnet `ExponentialMovingAverage`):
      `hidden = m * hidden + (1 - m) * x̄`, `average = hidden / (1 - m**counter)`
      (`hidden` starts at zeros, so the first average is the first batch
      mean exactly)

    The input passes through unchanged. In inference nothing is updated.
    `layer.average` holds the moving average, shape `input_shape[1:]`.

    **`trainable=False`** stops the updates (recompile after changing it);
    `freeze_state()` stops them while training goes on.

    Args:
        momentum: Weight of the old average, in `[0, 1)`, as in Keras's
            `BatchNormalization`. Defaults to `0.99`.
        zero_debias: Whether to debias the average for its zero start.
            Defaults to `False`.
        **kwargs: `StatefulLayer` arguments (`guard_non_finite`, `name`, ...).

    Call arguments:
        inputs: A tensor of shape `(batch, ...)`.
        training: Whether the call is in training mode (updates the average).

    Example:

    ```python
    layer = keras_stateful.layers.MovingAverage(momentum=0.9, zero_debias=True)
    layer(np.ones((8, 3)), training=True)
    layer.average  # [1., 1., 1.]: the first debiased average is the batch mean
    ```

    Reference:
        - [Haiku `ExponentialMovingAverage`](https://github.com/google-deepmind/dm-haiku/blob/main/haiku/_src/moving_averages.py)
    """

    def __init__(
        self, momentum: float = 0.99, *, zero_debias: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.momentum = _checks.momentum(
            momentum, layer="MovingAverage", example="MovingAverage(momentum=0.99)"
        )
        self.zero_debias = bool(zero_debias)
        self.average = None
        self.hidden = None
        self.counter = None

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        if None in tuple(input_shape[1:]):
            raise ValueError(
                f"Layer '{self.name}': every axis but the batch axis must be "
                f"known to build the average; received input shape "
                f"{tuple(input_shape)}. Give the model input a full shape, "
                "e.g. `keras.Input(shape=(16,))`."
            )
        feature_shape = tuple(int(dim) for dim in input_shape[1:])  # type: ignore[arg-type]
        self.input_spec = keras.layers.InputSpec(
            shape=(None, *feature_shape), allow_last_axis_squeeze=False
        )
        self.average = self.add_state("average", feature_shape)
        if self.zero_debias:
            self.hidden = self.add_state("hidden", feature_shape)
        self.counter = self.add_state("counter", (), dtype="int32")
        self.add_statistic("sum", feature_shape)
        self.add_statistic("count")

    def call(self, inputs: Tensor, training: bool | Tensor | None = None) -> Tensor:
        if not self.may_update(training):
            return inputs
        batch_sum = distributed.cross_replica_sum(
            ops.sum(ops.cast(inputs, "float32"), axis=0)
        )
        batch_size = distributed.cross_replica_sum(
            ops.cast(ops.shape(inputs)[0], "float32")
        )
        totals = self.accumulate(
            {"sum": batch_sum, "count": batch_size}, training=training
        )
        batch_mean = totals["sum"] / totals["count"]
        counter = next_count(self.counter)
        momentum = ops.convert_to_tensor(self.momentum, "float32")
        if self.zero_debias:
            hidden = ema(self.hidden, batch_mean, momentum)
            debias = 1.0 - ops.power(momentum, ops.cast(counter, "float32"))
            self.commit_state(
                (self.hidden, hidden),
                (self.average, hidden / debias),
                (self.counter, counter),
                training=training,
            )
        else:
            self.commit_state(
                (self.average, ema(self.average, batch_mean, momentum)),
                (self.counter, counter),
                training=training,
            )
        return inputs

    def compute_output_shape(
        self, input_shape: tuple[int | None, ...]
    ) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "momentum": self.momentum,
            "zero_debias": self.zero_debias,
        }
