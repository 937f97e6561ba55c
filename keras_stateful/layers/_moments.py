"""Moments shared by the running-statistics layers: batch moments, their
exact merge into running ones, and the exponential moving average."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_stateful import _backend, distributed
from keras_stateful.types import Tensor


def feature_axes(ndim: int, axis: int | Sequence[int], layer_name: str) -> list[int]:
    """The non-negative feature axes, with a clear error when out of range."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    resolved = []
    for a in axes:
        if not isinstance(a, int) or not -ndim <= a < ndim or a % ndim == 0:
            raise ValueError(
                f"Layer '{layer_name}': feature axis {a!r} does not fit an input "
                f"of rank {ndim} (axis 0 is the batch). Pass e.g. `axis=-1` for "
                "channels-last features."
            )
        resolved.append(a % ndim)
    return sorted(set(resolved))


def feature_shape(
    input_shape: Sequence[int | None], axis: int | Sequence[int], layer_name: str
) -> tuple[list[int], tuple[int, ...], keras.layers.InputSpec]:
    """The feature axes, the per-feature state shape, and the input spec."""
    axes = feature_axes(len(input_shape), axis, layer_name)
    sizes = [input_shape[a] for a in axes]
    if None in sizes:
        raise ValueError(
            f"Layer '{layer_name}': the feature axes {axes} must have a known "
            f"size; received input shape {tuple(input_shape)}."
        )
    shape = tuple(int(dim) for dim in sizes if dim is not None)
    spec = keras.layers.InputSpec(
        ndim=len(input_shape), axes=dict(zip(axes, shape, strict=True))
    )
    return axes, shape, spec


def batch_moments(
    inputs: Tensor,
    reduce_axes: Sequence[int],
    mask: Tensor | None = None,
    shift: Tensor | None = None,
    shift_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(count, shift, mean - shift, m2)` over `reduce_axes`, over all replicas.

    The batch mean is `shift + (mean - shift)`; the two parts are returned
    apart so that a caller can use the small difference without rounding it
    to the precision of a large mean. `m2` is the sum of squared deviations
    from the mean. The sums are taken of `x - shift` (e.g. the stored mean;
    a first-pass batch mean where `shift` is None or `shift_valid` is false,
    as for a first batch), so a large common offset (values around 1e6) does
    not cancel the variance away in float32. Masked-out values (mask false
    or 0) are left out, whatever they hold; when nothing is left the mean
    offset is NaN. The results keep the reduced axes (size 1).

    On eager PyTorch on one process, with no mask and no shift given, one
    fused kernel computes the moments of `x` minus its first value per
    feature (`_backend.shifted_moments_fused`); the results then hold one
    value per feature, the reduced axes possibly dropped. `moments_by_name`
    reshapes either form to the per-feature shape.
    """
    x = _backend.as_float32(inputs)
    axes = tuple(reduce_axes)
    if mask is None and shift is None:
        fused = _fused_moments(x, axes)
        if fused is not None:
            n, shift, mean_offset, variance = fused
            return _backend.full_like(variance, n), shift, mean_offset, variance * n

    def global_sum(values: Tensor) -> Tensor:
        return distributed.cross_replica_sum(_backend.sum_keepdims(values, axes))

    if mask is None:
        # Every value counts: no weights, no selects (on eager PyTorch each
        # is one more pass over the batch).
        total = global_sum(x)
        count = global_sum(_values_per_feature(total, x, axes))
    else:
        weight = ops.cast(mask, "float32")
        while len(weight.shape) < len(x.shape):
            weight = ops.expand_dims(weight, -1)
        weight = ops.broadcast_to(weight, ops.shape(x))
        present = weight > 0
        x = ops.where(present, x, 0.0)
        total = global_sum(weight * x)
        count = global_sum(weight)

    safe_count = _backend.maximum(count, 1e-30)
    if shift is None or shift_valid is not None:
        first_pass = total / safe_count
        shift = (
            first_pass if shift is None else ops.where(shift_valid, shift, first_pass)
        )
    centred = x - shift
    if mask is None:
        first = global_sum(centred)
        second = global_sum(_backend.square(centred))
    else:
        centred = ops.where(present, centred, 0.0)
        first = global_sum(weight * centred)
        second = global_sum(weight * ops.square(centred))
    mean_offset = first / safe_count
    m2 = _backend.maximum(second - first * mean_offset, 0.0)
    # Nothing seen (an empty or fully masked batch): a NaN mean, so that the
    # base class's non-finite guard skips the update and counts the skip.
    mean_offset = _backend.where(count > 0, mean_offset, float("nan"))
    return count, shift, mean_offset, m2


def batch_mean_and_variance(
    inputs: Tensor, reduce_axes: Sequence[int], mask: Tensor | None = None
) -> tuple[Tensor | float, Tensor, Tensor]:
    """`(count, mean, biased variance)` over `reduce_axes`, over all replicas.

    `batch_moments` combined, for a layer that needs no more; on eager
    PyTorch straight from the fused kernel (nothing to add or divide), with
    the count, the same for every feature, as a Python number. The mean and
    variance hold one value per feature, in `batch_moments`' shapes.
    """
    if mask is None:
        fused = _fused_moments(_backend.as_float32(inputs), tuple(reduce_axes))
        if fused is not None:
            n, shift, mean_offset, variance = fused
            mean = shift + _backend.reshape(mean_offset, tuple(shift.shape))
            return float(n), mean, variance
    count, shift, mean_offset, m2 = batch_moments(inputs, reduce_axes, mask)
    return count, shift + mean_offset, m2 / count


def _fused_moments(
    x: Tensor, axes: tuple[int, ...]
) -> tuple[int, Tensor, Tensor, Tensor] | None:
    """`_backend.shifted_moments_fused` on one process, else None."""
    if distributed.communicates():
        return None
    return _backend.shifted_moments_fused(x, axes)


def ema(old: keras.Variable, new: Tensor, momentum: float | Tensor) -> Tensor:
    """`momentum * old + (1 - momentum) * new`, with `momentum` as float32.

    The float32 momentum is the same number a zero-debiasing step raises to
    a power, so `ema` of a zero-started value divided by `1 - momentum**t`
    is debiased exactly. On eager PyTorch a Python momentum takes one
    `torch.lerp` (`_backend.ema_fused`), which agrees to about a float32 ulp.
    """
    if ops.is_tensor(momentum):
        m = ops.cast(momentum, "float32")
        return m * _backend.read_value(old) + (1.0 - m) * new
    # Python numbers, each exactly a float32: no tensor to make per call.
    keep, take = _ema_weights(momentum)
    old_value = _backend.read_value(old)
    fused = _backend.ema_fused(old_value, new, take)
    if fused is not None:
        return fused
    return keep * old_value + take * new


@functools.lru_cache(maxsize=256)
def _ema_weights(momentum: float) -> tuple[float, float]:
    """`momentum` and `1 - momentum` as float32 numbers (Python floats)."""
    m32 = np.float32(momentum)
    return float(m32), float(np.float32(1) - m32)


def merge_moments(
    count: Tensor,
    mean: Tensor,
    mean_correction: Tensor,
    variance: Tensor,
    batch_count: Tensor,
    batch_shift: Tensor,
    batch_mean_offset: Tensor,
    batch_m2: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Running moments with a batch merged in, exactly (Chan et al.).

    The running moments are the count `n`, the mean as a float32 pair
    `mean + mean_correction` (the correction holds what float32 rounds off
    a large mean) and the biased variance `σ²`; the batch's are as
    `batch_moments` returns them: `n_B`, the mean as `shift + offset`, and
    `M2_B`. With `δ = μ_B - μ` and `n' = n + n_B`:

    - `μ' = μ + δ * n_B / n'` (kept as a pair: TwoSum of the large parts,
      the small parts and the rounding error added separately)
    - `σ²' = (n * σ² + M2_B + δ² * n * n_B / n') / n'` (never negative)

    When the shift is the stored mean, the large parts of `δ` cancel
    exactly. All arguments have the same (per-feature) shape; the function
    has no side effect.

    Returns:
        `(n', mean', mean_correction', σ²')`.

    Reference:
        - [Chan, Golub & LeVeque, 1979](https://doi.org/10.1007/978-3-642-51461-6_3)
    """
    delta_high = batch_shift - mean
    delta_low = batch_mean_offset - mean_correction
    delta = delta_high + delta_low
    total = count + batch_count
    weight = batch_count / ops.maximum(total, 1e-30)
    high, rounded_off = _two_sum(mean, delta_high * weight)
    low = mean_correction + delta_low * weight + rounded_off
    new_mean, new_correction = _two_sum(high, low)
    m2 = count * variance + batch_m2 + ops.square(delta) * count * weight
    new_variance = ops.maximum(m2 / ops.maximum(total, 1e-30), 0.0)
    return total, new_mean, new_correction, new_variance


MOMENTS = ("count", "shift", "mean_offset", "m2")


def add_moment_statistics(layer: Any, shape: tuple[int, ...]) -> None:
    """Declare `batch_moments`' results as the layer's statistics (in build)."""
    for name in MOMENTS:
        layer.add_statistic(name, shape)


def moments_by_name(
    moments: tuple[Tensor, ...], shape: tuple[int, ...]
) -> dict[str, Tensor]:
    """`batch_moments`' results by name, reshaped to the per-feature `shape`."""
    return {
        k: _backend.reshape(v, shape) for k, v in zip(MOMENTS, moments, strict=True)
    }


def merge_batch_moments(
    window: dict[str, Tensor], batch: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Two sets of `batch_moments` results as one, exactly (Chan et al.).

    Each is `{count, shift, mean_offset, m2}`; an empty window has all
    zeros. The merged mean is again a pair (`shift + mean_offset`).
    """
    count, mean, correction, variance = merge_moments(
        window["count"],
        window["shift"],
        window["mean_offset"],
        window["m2"] / ops.maximum(window["count"], 1e-30),
        batch["count"],
        batch["shift"],
        batch["mean_offset"],
        batch["m2"],
    )
    return {
        "count": count,
        "shift": mean,
        "mean_offset": correction,
        "m2": variance * count,
    }


def _two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """`(a + b rounded, what the rounding lost)`, exactly (Knuth's TwoSum)."""
    total = a + b
    b_kept = total - a
    return total, (a - (total - b_kept)) + (b - b_kept)


def _values_per_feature(like: Tensor, x: Tensor, axes: tuple[int, ...]) -> Tensor:
    """How many values of `x` each feature has, in the shape and dtype of `like`.

    The product of `axes`' sizes: a constant when they are known (one op),
    else computed from the dynamic shape.
    """
    shape = ops.shape(x)
    sizes = [shape[axis] for axis in axes]
    if all(isinstance(size, int) for size in sizes):
        return _backend.full_like(like, float(math.prod(sizes)))
    count = ops.convert_to_tensor(1.0, "float32")
    for size in sizes:
        count = count * ops.cast(size, "float32")
    return ops.ones_like(like) * count
