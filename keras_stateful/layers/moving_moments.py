"""`MovingMoments`: moving per-feature mean and variance, as BatchNorm keeps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import keras
from keras import ops

from keras_stateful import _backend
from keras_stateful.layers import _checks
from keras_stateful.layers._moments import (
    add_moment_statistics,
    batch_mean_and_variance,
    batch_moments,
    ema,
    feature_shape,
    merge_batch_moments,
    moments_by_name,
)
from keras_stateful.stateful_layer import StatefulLayer, next_count
from keras_stateful.types import Tensor


@keras.saving.register_keras_serializable(package="keras_stateful")
class MovingMoments(StatefulLayer):
    """Moving mean and variance of each feature; returns its input unchanged.

    In training, with `μ_B` and `σ²_B` the mean and variance of the batch over
    every axis but `axis` (float32, masked values left out), `n` the number of
    values reduced per feature and `t` the step counter after this step:

    - `counter = counter + 1` (int32, stops at 2**31 - 1)
    - `v_B = σ²_B` (biased, as Keras's `BatchNormalization` stores it), or
      `v_B = n / (n - 1) * σ²_B` with `unbiased=True` (as
      `torch.nn.BatchNorm*` stores it)
    - `m = momentum`, or `m = 1 - 1 / t` with `momentum=None` (the
      cumulative average of all batches, PyTorch's `momentum=None`)
    - `moving_mean = m * moving_mean + (1 - m) * μ_B`
    - `moving_variance = m * moving_variance + (1 - m) * v_B`
    - with `zero_debias=True` (Haiku/Sonnet): the two EMAs run on zero-started
      hidden values and `moving = hidden / (1 - m**t)`

    `moving_mean` starts at 0 and `moving_variance` at 1, as in Keras and
    PyTorch. A batch with nothing to count (empty, fully masked) or, with
    `unbiased=True`, a single value per feature gives a non-finite
    statistic: the update is skipped and counted in `skipped_updates`.

    Torch's `BatchNorm1d(momentum=p)` keeps the same numbers as
    `MovingMoments(momentum=1 - p, unbiased=True)`.

    **`trainable=False`** stops the updates (recompile after changing it);
    `freeze_state()` stops them while training goes on.

    Args:
        axis: The feature axis or axes; statistics are kept per feature.
            Defaults to `-1`.
        momentum: Weight of the old value, in `[0, 1)`, Keras's convention
            (PyTorch's `momentum=0.1` is `0.9` here), or `None` for the
            cumulative average. Defaults to `0.99`.
        unbiased: Whether to store the Bessel-corrected batch variance.
            Defaults to `False`.
        zero_debias: Whether to debias the EMAs for their zero start.
            Defaults to `False`.
        **kwargs: `StatefulLayer` arguments (`guard_non_finite`, `name`, ...).

    Call arguments:
        inputs: A tensor of rank 2 or more.
        training: Whether the call is in training mode (updates the moments).
        mask: Optional boolean mask of shape `inputs.shape[:k]` (e.g. from an
            `Embedding(mask_zero=True)`); masked values are left out.

    Example:

    ```python
    moments = keras_stateful.layers.MovingMoments(momentum=0.9)
    moments(np.random.normal(3.0, 2.0, (256, 4)), training=True)
    moments.moving_mean, moments.moving_variance  # ~0.3 and ~1.3 after one step
    ```

    Reference:
        - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167)
        - [`torch.nn.BatchNorm1d`](https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm1d.html)
    """

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        momentum: float | None = 0.99,
        *,
        unbiased: bool = False,
        zero_debias: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        momentum = _checks.optional(
            _checks.momentum,
            momentum,
            "momentum",
            or_none="None (the cumulative average)",
            layer="MovingMoments",
            example="MovingMoments(momentum=0.99)",
        )
        if momentum is None and zero_debias:
            raise ValueError(
                "MovingMoments: momentum=None (a cumulative average) has no "
                "zero start to debias; drop zero_debias=True."
            )
        self.axis = axis if isinstance(axis, int) else tuple(axis)
        self.momentum = momentum
        self.unbiased = bool(unbiased)
        self.zero_debias = bool(zero_debias)
        self.supports_masking = True
        self.moving_mean = None
        self.moving_variance = None
        self.counter = None
        self._axes: list[int] = []
        self._feature_shape: tuple[int, ...] = ()

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self._axes, shape, self.input_spec = feature_shape(
            input_shape, self.axis, self.name
        )
        self._feature_shape = shape
        self.moving_mean = self.add_state("moving_mean", shape)
        self.moving_variance = self.add_state("moving_variance", shape, "ones")
        if self.zero_debias:
            self.mean_hidden = self.add_state("mean_hidden", shape)
            self.variance_hidden = self.add_state("variance_hidden", shape)
        self.counter = self.add_state("counter", (), dtype="int32")
        add_moment_statistics(self, shape)

    def call(
        self,
        inputs: Tensor,
        training: bool | Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        if not self.may_update(training):
            return inputs
        count, mean, variance = self._batch_statistics(inputs, training, mask)
        if self.unbiased:
            variance = variance * _bessel_correction(count)

        counter = next_count(self.counter)
        if self.momentum is None:
            momentum = 1.0 - 1.0 / ops.cast(counter, "float32")
        elif self.zero_debias:
            momentum = ops.convert_to_tensor(self.momentum, "float32")
        else:
            momentum = self.momentum
        if self.zero_debias:
            mean_hidden = ema(self.mean_hidden, mean, momentum)
            variance_hidden = ema(self.variance_hidden, variance, momentum)
            debias = 1.0 - ops.power(momentum, ops.cast(counter, "float32"))
            self.commit_state(
                (self.mean_hidden, mean_hidden),
                (self.variance_hidden, variance_hidden),
                (self.moving_mean, mean_hidden / debias),
                (self.moving_variance, variance_hidden / debias),
                (self.counter, counter),
                training=training,
            )
        else:
            self.commit_state(
                (self.moving_mean, ema(self.moving_mean, mean, momentum)),
                (self.moving_variance, ema(self.moving_variance, variance, momentum)),
                (self.counter, counter),
                training=training,
            )
        return inputs

    def _batch_statistics(
        self, inputs: Tensor, training: bool | Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor | float, Tensor, Tensor]:
        """`(count, mean, biased variance)` of the batch, or of the window so far."""
        reduce = [a for a in range(len(inputs.shape)) if a not in self._axes]
        if self.accumulation_steps == 1:
            count, mean, variance = batch_mean_and_variance(inputs, reduce, mask)
            shape = self._feature_shape
            if not isinstance(count, float):  # a tensor, as batch_moments keeps it
                count = _backend.reshape(count, shape)
            return (
                count,
                _backend.reshape(mean, shape),
                _backend.reshape(variance, shape),
            )
        stats = self.accumulate(
            moments_by_name(batch_moments(inputs, reduce, mask), self._feature_shape),
            training=training,
            merge=merge_batch_moments,
        )
        count = stats["count"]
        return count, stats["shift"] + stats["mean_offset"], stats["m2"] / count

    @contextlib.contextmanager
    def calibration(self) -> Iterator[None]:
        """During `keras_stateful.calibrate`: the cumulative average.

        As PyTorch's `update_bn` does, the recomputed moments are the plain
        average over the calibration batches. A zero-debiased layer keeps its
        momentum (its debiased EMA has no zero-start bias to remove).
        """
        if self.zero_debias:
            yield
            return
        momentum, self.momentum = self.momentum, None
        try:
            yield
        finally:
            self.momentum = momentum

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
            "momentum": self.momentum,
            "unbiased": self.unbiased,
            "zero_debias": self.zero_debias,
        }


def _bessel_correction(count: Tensor | float) -> Tensor | float:
    """`n / (n - 1)`; NaN for one value per feature, so that the update is skipped."""
    if isinstance(count, float):
        return count / (count - 1.0) if count > 1.0 else float("nan")
    return count / (count - 1.0)
