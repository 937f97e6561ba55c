"""`PercentileNormalization`: DreamerV3's return scale, moving percentiles as state."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_stateful import _backend, distributed
from keras_stateful.layers import _checks
from keras_stateful.layers._moments import ema
from keras_stateful.stateful_layer import StatefulLayer, next_count
from keras_stateful.types import Tensor


@keras.saving.register_keras_serializable(package="keras_stateful")
class PercentileNormalization(StatefulLayer):
    """Scales by a moving percentile range: DreamerV3's return normalization.

    It keeps `lo` and `hi`, moving averages of the `low`-th and `high`-th
    percentiles of its inputs, both starting at 0, and returns

    - `(x - lo) / max(limit, hi - lo)`, or `x / max(limit, hi - lo)` with
      `scale_only=True`,

    elementwise, in the layer's compute dtype. In training, with
    `P_q(x)` the `q`-th percentile of all elements of the batch (flattened,
    as DreamerV3 does; in data-parallel training, of the global batch), the
    update comes first and the output uses the new `lo` and `hi`:

    - `lo = (1 - rate) * lo + rate * P_low(x)`
    - `hi = (1 - rate) * hi + rate * P_high(x)`

    With `debias=True` these moving averages are zero-debiased as Haiku's
    `ExponentialMovingAverage(decay=1 - rate, zero_debias=True)` keeps them:
    hidden averages `lo_hidden` and `hi_hidden` follow the rule above, a
    `counter` counts the updates, and `lo = lo_hidden / (1 - (1 - rate) **
    counter)` (likewise `hi`), so that the first update sets `lo = P_low(x)`.

    The percentiles interpolate linearly between the two nearest sorted
    values, as `numpy.percentile` does by default: with `n` elements sorted
    into `s` and `p = q / 100 * (n - 1)`, `P_q = s[floor(p)] + (p -
    floor(p)) * (s[ceil(p)] - s[floor(p)])`. They are computed by a sort, so
    they run inside a compiled (`jit_compile`) `fit` on every backend; a
    batch costs `O(n log n)` for its `n` elements. A batch with no elements,
    or a NaN or infinite element, leaves `lo` and `hi` as they are (see
    `guard_non_finite`). In inference nothing changes.

    Gradients reach `x` through the output; `lo` and `hi` are constants to
    them (as in DreamerV3, which stops their gradient).

    **`trainable=False`** stops the updates (recompile after changing it);
    `freeze_state()` stops them while training goes on.

    Args:
        rate: Weight of the new percentile in the moving average. Defaults
            to `0.01`.
        limit: Smallest scale `max(limit, hi - lo)` divides by, so that
            returns spread less than `limit` are not blown up. Defaults to
            `1.0`.
        low: Lower percentile, in percent (0 to 100). Defaults to `5`.
        high: Upper percentile, in percent, above `low`. Defaults to `95`.
        debias: Whether to zero-debias the moving averages (Haiku's
            `zero_debias`). Defaults to `False`.
        scale_only: Whether to divide without subtracting `lo`. Defaults to
            `False`.
        **kwargs: `StatefulLayer` arguments (`guard_non_finite`, `name`, ...).

    Call arguments:
        inputs: A float tensor of any shape, e.g. returns `(B, T)`.
        training: Whether the call is in training mode (updates `lo` and
            `hi` before normalising).

    Example:

    ```python
    returns = np.array([[0.0, 10.0, 20.0], [30.0, 40.0, 50.0]], "float32")
    norm = keras_stateful.layers.PercentileNormalization(rate=1.0)
    scaled = norm(returns, training=True)
    # lo = P5 = 2.5, hi = P95 = 47.5: scaled = (returns - 2.5) / 45
    ```

    Reference:
        - [Hafner et al., 2023](https://arxiv.org/abs/2301.04104) (DreamerV3,
          Section "Robust predictions", return normalization), and its
          [code](https://github.com/danijar/dreamerv3) (`Normalize(impl="perc")`)
    """

    def __init__(
        self,
        rate: float = 0.01,
        limit: float = 1.0,
        *,
        low: float = 5.0,
        high: float = 95.0,
        debias: bool = False,
        scale_only: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        layer = "PercentileNormalization"
        self.rate = _checks.number(
            rate,
            "rate",
            layer=layer,
            example=f"{layer}(rate=0.01)",
            exclusive_minimum=0.0,
            maximum=1.0,
            meaning="the weight of the new percentile",
        )
        self.limit = _checks.number(
            limit,
            "limit",
            layer=layer,
            example=f"{layer}(limit=1.0)",
            exclusive_minimum=0.0,
            meaning="the smallest scale",
        )
        self.low = _checks.number(
            low,
            "low",
            layer=layer,
            example=f"{layer}(low=5, high=95)",
            minimum=0.0,
            maximum=100.0,
            meaning="a percent",
        )
        self.high = _checks.number(
            high,
            "high",
            layer=layer,
            example=f"{layer}(low=5, high=95)",
            minimum=0.0,
            maximum=100.0,
            meaning="a percent",
        )
        if not self.low < self.high:
            raise ValueError(
                f"{layer}: low must be below high (both percents); received "
                f"low={low!r}, high={high!r}. Write e.g. `{layer}(low=5, high=95)`."
            )
        self.debias = _switch(debias, "debias")
        self.scale_only = _switch(scale_only, "scale_only")
        self.lo = None
        self.hi = None
        self.lo_hidden = None
        self.hi_hidden = None
        self.counter = None

    def build(self, input_shape: Any) -> None:
        self.lo = self.add_state("lo", ())
        self.hi = self.add_state("hi", ())
        if self.debias:
            self.lo_hidden = self.add_state("lo_hidden", ())
            self.hi_hidden = self.add_state("hi_hidden", ())
            self.counter = self.add_state("counter", (), dtype="int32")
        # Percentiles have no sufficient statistics: with accumulation_steps=N
        # the window's update uses the mean of its micro-batches' percentiles.
        for name in ("low", "high", "micro_batches"):
            self.add_statistic(name)

    def call(self, inputs: Tensor, training: bool | Tensor | None = None) -> Tensor:
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if not keras.backend.is_float_dtype(dtype):
            raise TypeError(
                f"Layer '{self.name}': inputs must be floats; received dtype "
                f'{dtype}. Cast them first: `ops.cast(returns, "float32")`.'
            )
        x = ops.cast(inputs, "float32")
        if self.may_update(training) and 0 not in tuple(x.shape):
            self._update(ops.stop_gradient(x), training)
        # Read after the commit: the new lo and hi when the layer updated.
        lo = _backend.read_value(self.lo)
        hi = _backend.read_value(self.hi)
        scale = ops.maximum(hi - lo, self.limit)
        outputs = x / scale if self.scale_only else (x - lo) / scale
        return ops.cast(outputs, self.compute_dtype)

    def _update(self, x: Tensor, training: bool | Tensor) -> None:
        """Move lo and hi towards this batch's (all replicas') percentiles."""
        values, valid = _global_elements(x)
        low, high = percentiles(values, valid, (self.low, self.high))
        window = self.accumulate(
            {"low": low, "high": high, "micro_batches": ops.ones(())},
            training=training,
        )
        low = window["low"] / window["micro_batches"]
        high = window["high"] / window["micro_batches"]
        if not self.debias:
            self.commit_state(
                (self.lo, ema(self.lo, low, 1.0 - self.rate)),
                (self.hi, ema(self.hi, high, 1.0 - self.rate)),
                training=training,
            )
            return
        decay = ops.convert_to_tensor(1.0 - self.rate, "float32")
        counter = next_count(self.counter)
        lo_hidden = ema(self.lo_hidden, low, decay)
        hi_hidden = ema(self.hi_hidden, high, decay)
        correction = 1.0 - ops.power(decay, ops.cast(counter, "float32"))
        self.commit_state(
            (self.lo_hidden, lo_hidden),
            (self.hi_hidden, hi_hidden),
            (self.counter, counter),
            (self.lo, lo_hidden / correction),
            (self.hi, hi_hidden / correction),
            training=training,
        )

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "rate": self.rate,
            "limit": self.limit,
            "low": self.low,
            "high": self.high,
            "debias": self.debias,
            "scale_only": self.scale_only,
        }


def _switch(value: Any, name: str) -> bool:
    """`value` if it is a bool (a string such as `"no"` would read as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"PercentileNormalization: {name} must be True or False; received "
            f"{name}={value!r}. Write e.g. `PercentileNormalization({name}=True)`."
        )
    return bool(value)


def _global_elements(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """All elements of every replica's batch, flat, and which are real.

    On one device (and on JAX, whose batch is already global) the mask is
    None: every element counts.
    """
    rows, present = distributed.cross_replica_gather(x)
    values = ops.reshape(rows, (-1,))
    if present is None:
        return values, None
    per_row = ops.ones(ops.shape(rows)[1:], "bool")
    valid = ops.logical_and(
        ops.reshape(present, (-1,) + (1,) * (len(rows.shape) - 1)), per_row
    )
    return values, ops.reshape(valid, (-1,))


def percentiles(
    values: Tensor, valid: Tensor | None, percents: tuple[float, ...]
) -> list[Tensor]:
    """`numpy.percentile(values[valid], q)` for each `q`, by one sort.

    Linear interpolation as NumPy's default, including its rounding (`b -
    (b - a) * (1 - t)` for `t >= 0.5`). NaN when there is no valid value or
    a valid value is NaN or infinite.
    """
    if valid is None:
        ordered = ops.sort(values)
        count = ops.cast(ops.shape(values)[0], "int32")
    else:
        # Padding sorts last, with any real +inf: the first `count` sorted
        # values are the real ones.
        ordered = ops.sort(ops.where(valid, values, float("inf")))
        count = ops.sum(ops.cast(valid, "int32"))
    last = ops.maximum(count - 1, 0)
    finite = ops.isfinite(values)
    if valid is not None:
        finite = ops.logical_or(finite, ops.logical_not(valid))
    # NumPy gives NaN for a NaN anywhere; here any non-finite value does, so
    # that the non-finite guard skips the update.
    usable = ops.logical_and(count > 0, ops.all(finite))
    results = []
    for q in percents:
        position = ops.cast(last, "float32") * (q / 100.0)
        below = ops.minimum(ops.cast(ops.floor(position), "int32"), last)
        above = ops.minimum(below + 1, last)
        t = position - ops.cast(below, "float32")
        a = ops.take(ordered, below)
        b = ops.take(ordered, above)
        value = ops.where(t >= 0.5, b - (b - a) * (1.0 - t), a + (b - a) * t)
        results.append(ops.where(usable, value, float("nan")))
    return results
