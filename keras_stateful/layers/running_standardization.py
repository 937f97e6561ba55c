"""`RunningStandardization`: standardise with the exact statistics of all data seen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from keras_stateful import _backend
from keras_stateful.layers import _checks
from keras_stateful.layers._moments import (
    MOMENTS,
    add_moment_statistics,
    batch_moments,
    feature_shape,
    merge_batch_moments,
    merge_moments,
    moments_by_name,
)
from keras_stateful.stateful_layer import StatefulLayer
from keras_stateful.types import Tensor


@keras.saving.register_keras_serializable(package="keras_stateful")
class RunningStandardization(StatefulLayer):
    """Standardises features with the exact running mean and variance of training data.

    The state is the count `n`, mean `μ` and (biased) variance `σ²` of every
    value seen in training, per feature (every axis but `axis` is reduced).
    A training batch with count `n_B`, mean `μ_B` and sum of squared
    deviations `M2_B` is merged exactly (Chan et al.), as Stable-Baselines3's
    `RunningMeanStd` does:

    - `δ = μ_B - μ`, `n' = n + n_B`
    - `μ = μ + δ * n_B / n'`
    - `σ² = (n * σ² + M2_B + δ² * n * n_B / n') / n'`
    - `n = n'`

    The batch moments are taken around the stored mean (around a first-pass
    batch mean for the first batch), and the mean is kept as a float32 pair
    (`mean` plus the small `mean_correction` that float32 rounds off), so
    float32 keeps the variance of data with a large offset (values near 1e6
    with unit spread) to float32 precision, where `E[x²] - E[x]²` loses it
    entirely; the variance is never negative.

    The output is `(x - μ) / sqrt(σ² + epsilon)`, clipped to `[-clip, clip]`
    when `clip` is set, in the layer's compute dtype. In training it uses the
    statistics after merging the current batch; in inference the stored ones
    (before any training: mean 0, variance 1). A batch with nothing to count
    (empty or fully masked) leaves the state alone and is counted in
    `skipped_updates`. `n` is float32: exact up to 2**24 values per feature,
    then rounded to float32 (relative error below 1e-7 in the merge weights).

    **`trainable=False`** stops the updates (recompile after changing it);
    `freeze_state()` stops them while training goes on.

    Args:
        axis: The feature axis or axes. Defaults to `-1`.
        epsilon: Added to the variance before the square root.
            Defaults to `1e-8` (as Stable-Baselines3's `VecNormalize`).
        clip: If set, the output is clipped to `[-clip, clip]`.
            Defaults to `None`.
        **kwargs: `StatefulLayer` arguments (`guard_non_finite`, `name`, ...).

    Call arguments:
        inputs: A tensor of rank 2 or more.
        training: Whether the call is in training mode (merges the batch).
        mask: Optional boolean mask of shape `inputs.shape[:k]`; masked values
            are left out of the statistics (and still standardised).

    Example:

    ```python
    inputs = keras.Input((8,))  # raw observations
    x = keras_stateful.layers.RunningStandardization(clip=10.0)(inputs)
    outputs = keras.layers.Dense(1)(x)
    ```

    Reference:
        - [Chan, Golub & LeVeque, 1979](https://doi.org/10.1007/978-3-642-51461-6_3)
        - [Stable-Baselines3 `RunningMeanStd`](https://github.com/DLR-RM/stable-baselines3/blob/master/stable_baselines3/common/running_mean_std.py)
    """

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        *,
        epsilon: float = 1e-8,
        clip: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.epsilon = _checks.number(
            epsilon,
            "epsilon",
            layer="RunningStandardization",
            example="RunningStandardization(epsilon=1e-8)",
            minimum=0.0,
        )
        self.clip = _checks.optional(
            _checks.number,
            clip,
            "clip",
            or_none="None (no clipping)",
            layer="RunningStandardization",
            example="RunningStandardization(clip=10.0)",
            exclusive_minimum=0.0,
        )
        self.axis = axis if isinstance(axis, int) else tuple(axis)
        self.supports_masking = True
        self.count = None
        self.mean = None
        self.variance = None
        self._axes: list[int] = []
        self._feature_shape: tuple[int, ...] = ()

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self._axes, shape, self.input_spec = feature_shape(
            input_shape, self.axis, self.name
        )
        self._feature_shape = shape
        self.count = self.add_state("count", shape)
        self.mean = self.add_state("mean", shape)
        self.mean_correction = self.add_state("mean_correction", shape)
        self.variance = self.add_state("variance", shape, "ones")
        add_moment_statistics(self, shape)

    def call(
        self,
        inputs: Tensor,
        training: bool | Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        rank = len(inputs.shape)
        reduce = [a for a in range(rank) if a not in self._axes]
        kept = [1 if a in reduce else -1 for a in range(rank)]
        if self.may_update(training):
            count = _backend.read_value(self.count)
            mean = _backend.read_value(self.mean)
            moments = batch_moments(
                inputs,
                reduce,
                mask,
                shift=ops.reshape(mean, kept),
                shift_valid=ops.reshape(count > 0, kept),
            )
            batch = self.accumulate(
                moments_by_name(moments, self._feature_shape),
                training=training,
                merge=merge_batch_moments,
            )
            # The running mean is `mean + mean_correction` (a float32 pair:
            # float32 alone rounds a mean near 1e6 to 0.06, which would bias
            # the merged variance).
            total, new_mean, new_correction, new_variance = merge_moments(
                count,
                mean,
                _backend.read_value(self.mean_correction),
                _backend.read_value(self.variance),
                *(batch[k] for k in MOMENTS),
            )
            self.commit_state(
                (self.count, total),
                (self.mean, new_mean),
                (self.mean_correction, new_correction),
                (self.variance, new_variance),
                training=training,
            )
        mean = ops.reshape(_backend.read_value(self.mean), kept)
        correction = ops.reshape(_backend.read_value(self.mean_correction), kept)
        variance = ops.reshape(_backend.read_value(self.variance), kept)
        x = ops.cast(inputs, "float32")
        outputs = ((x - mean) - correction) * ops.rsqrt(variance + self.epsilon)
        if self.clip is not None:
            outputs = ops.clip(outputs, -self.clip, self.clip)
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(
        self, input_shape: tuple[int | None, ...]
    ) -> tuple[int | None, ...]:
        return input_shape

    def compute_mask(self, inputs: Tensor, mask: Tensor | None = None) -> Any:
        return mask

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "axis": self.axis,
            "epsilon": self.epsilon,
            "clip": self.clip,
        }
