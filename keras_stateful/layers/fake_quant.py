"""`FakeQuant`: fake quantization with a moving-average min/max observer."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_stateful import _backend, distributed
from keras_stateful.layers import _checks
from keras_stateful.stateful_layer import StatefulLayer, next_count
from keras_stateful.types import Tensor

_SCHEMES = ("affine", "symmetric")
# torch.finfo(torch.float32).eps, the floor of the scale in PyTorch's observers.
_EPS = 2.0**-23


@keras.saving.register_keras_serializable(package="keras_stateful")
class FakeQuant(StatefulLayer):
    """Fake quantization for quantization-aware training, range kept as state.

    The input is rounded to `num_bits`-bit levels and mapped back to floats,
    with a range kept by a moving-average min/max observer, as PyTorch's
    `FakeQuantize` with a `MovingAverageMinMaxObserver` (per tensor) or
    `MovingAveragePerChannelMinMaxObserver` (per channel, `axis=int`) does.

    In training, with `c = averaging_constant`, `x_min`, `x_max` the minimum
    and maximum of the batch (over all axes, or all axes but `axis`; in
    float32) and `observations` the number of batches seen so far:

    - first batch (`observations == 0`): `min_val = x_min`, `max_val = x_max`
    - later batches: `min_val = min_val + c * (x_min - min_val)`, and the same
      for `max_val`
    - `observations = observations + 1` (int32, stops at 2**31 - 1)

    The range in use always includes the current training batch (PyTorch
    observes first, then quantizes). With `min_neg = min(min_val, 0)`,
    `max_pos = max(max_val, 0)`, `eps = 2**-23` (float32 epsilon) and
    `round` rounding half to even:

    - `scheme="affine"` (`torch.per_tensor_affine` / `per_channel_affine`,
      `quint8`): `scale = max((max_pos - min_neg) / (quant_max - quant_min),
      eps)`, `zero_point = clip(quant_min - round(min_neg / scale),
      quant_min, quant_max)`; by default `quant_min, quant_max = 0,
      2**num_bits - 1`.
    - `scheme="symmetric"` (`torch.per_tensor_symmetric` /
      `per_channel_symmetric`, `qint8`): `scale = max(max(-min_neg, max_pos)
      / ((quant_max - quant_min) / 2), eps)`, `zero_point = 0`; by default
      `quant_min, quant_max = -2**(num_bits - 1), 2**(num_bits - 1) - 1`.
      (PyTorch's `quint8` symmetric variant, zero point 128, is not offered.)
    - `q = round(x / scale) + zero_point` (as `x * (1 / scale)`, as in
      PyTorch's kernel), `output = (clip(q, quant_min, quant_max) -
      zero_point) * scale`.

    The gradient passes straight through where `quant_min <= q <= quant_max`
    and is zero elsewhere, as for `torch.fake_quantize_per_tensor_affine`.
    In inference (or when the state is frozen) the stored range is used and
    nothing is updated. **Before the first training batch** there is no
    range: the input passes through unchanged (gradient 1), and
    `quantization_parameters()` returns PyTorch's defaults, scale 1.0 and
    zero point 0. Statistics and quantization are computed in float32; the
    output has the layer's compute dtype (mixed precision).

    **`trainable=False`** stops the updates (recompile after changing it);
    `freeze_state()` stops them while training goes on. Either way the
    stored range keeps quantizing.

    Args:
        num_bits: Number of bits of the quantized values, in `[2, 16]`.
            Defaults to `8`.
        scheme: `"affine"` (zero point from the range) or `"symmetric"`
            (zero point 0, range symmetric about 0). Defaults to `"affine"`.
        axis: `None` for one range over the whole tensor, or the channel axis
            for one range per channel (its size must be known at build).
            Defaults to `None`.
        averaging_constant: Weight `c` of the new batch in the moving min and
            max, in `[0, 1]` (PyTorch's name and convention). Defaults to
            `0.01`.
        quant_min: Smallest quantized value; give it with `quant_max` to
            override the range set by `num_bits`. The range must contain 0
            and hold at most `2**num_bits` values. Defaults to `None`.
        quant_max: Largest quantized value; see `quant_min`. Defaults to
            `None`.
        **kwargs: `StatefulLayer` arguments (`guard_non_finite`, `name`, ...).

    Call arguments:
        inputs: A float tensor of any shape; per channel, with a known size
            on `axis`.
        training: Whether the call is in training mode (updates the range).

    Example:

    ```python
    layer = keras_stateful.layers.FakeQuant(num_bits=8)
    y = layer(np.array([[-1.0, 0.3, 2.0]]), training=True)
    layer.min_val, layer.max_val  # -1.0, 2.0: the first batch sets the range
    scale, zero_point = layer.quantization_parameters()  # 3/255, 85
    ```

    Reference:
        - [Jacob et al., 2018](https://arxiv.org/abs/1712.05877)
        - [PyTorch `MovingAverageMinMaxObserver`](https://github.com/pytorch/pytorch/blob/main/torch/ao/quantization/observer.py)
    """

    def __init__(
        self,
        num_bits: int = 8,
        *,
        scheme: str = "affine",
        axis: int | None = None,
        averaging_constant: float = 0.01,
        quant_min: int | None = None,
        quant_max: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_bits = _checks.integer(
            num_bits,
            "num_bits",
            layer="FakeQuant",
            example="FakeQuant(num_bits=8)",
            minimum=2,
            maximum=16,
        )
        if scheme not in _SCHEMES:
            raise ValueError(
                f"FakeQuant: scheme must be 'affine' or 'symmetric'; received "
                f"scheme={scheme!r}. Write `FakeQuant(scheme='affine')` for "
                "torch.per_tensor_affine or 'symmetric' for "
                "torch.per_tensor_symmetric (per channel: also give `axis`)."
            )
        self.scheme = scheme
        self.axis = _checks.optional(
            _checks.integer,
            axis,
            "axis",
            or_none="None (one range per tensor)",
            layer="FakeQuant",
            example="FakeQuant(axis=-1)",
            meaning="the channel axis",
            error=TypeError,
        )
        self.averaging_constant = _checks.number(
            averaging_constant,
            "averaging_constant",
            layer="FakeQuant",
            example="FakeQuant(averaging_constant=0.01)",
            minimum=0.0,
            maximum=1.0,
            note="It is the weight of the new batch (PyTorch's convention): "
            "0.01 keeps 99% of the old range.",
        )
        self.quant_min, self.quant_max = self._quant_range(quant_min, quant_max)
        self.min_val = None
        self.max_val = None
        self.observations = None
        self._channel_axis: int | None = None
        self._rank = 0

    def _quant_range(
        self, quant_min: int | None, quant_max: int | None
    ) -> tuple[int, int]:
        if quant_min is None and quant_max is None:
            if self.scheme == "affine":
                return 0, 2**self.num_bits - 1
            return -(2 ** (self.num_bits - 1)), 2 ** (self.num_bits - 1) - 1
        if quant_min is None or quant_max is None:
            raise ValueError(
                "FakeQuant: give quant_min and quant_max together; received "
                f"quant_min={quant_min!r}, quant_max={quant_max!r}. Write e.g. "
                "`FakeQuant(scheme='symmetric', quant_min=-127, quant_max=127)`."
            )
        for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
            _checks.integer(
                value,
                name,
                layer="FakeQuant",
                example="FakeQuant(scheme='symmetric', quant_min=-127, quant_max=127)",
                error=TypeError,
            )
        if not (quant_min <= 0 <= quant_max and quant_min < quant_max) or (
            quant_max - quant_min + 1 > 2**self.num_bits
        ):
            raise ValueError(
                f"FakeQuant: the range [quant_min, quant_max] must contain 0 "
                f"and hold at most 2**num_bits = {2**self.num_bits} values; "
                f"received quant_min={quant_min!r}, quant_max={quant_max!r}. "
                "Write e.g. `FakeQuant(num_bits=8, quant_min=-127, "
                "quant_max=127)` or raise num_bits."
            )
        return int(quant_min), int(quant_max)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self._rank = len(input_shape)
        shape: tuple[int, ...] = ()
        if self.axis is not None:
            if not -self._rank <= self.axis < self._rank:
                raise ValueError(
                    f"Layer '{self.name}': axis={self.axis} is out of range "
                    f"for inputs of rank {self._rank} (shape "
                    f"{tuple(input_shape)}). Write an axis in "
                    f"[{-self._rank}, {self._rank}), e.g. `axis=-1` for the "
                    "last (channel) axis, or `axis=None` for one range."
                )
            self._channel_axis = self.axis % self._rank
            channels = input_shape[self._channel_axis]
            if channels is None:
                raise ValueError(
                    f"Layer '{self.name}': the channel axis {self.axis} of the "
                    f"input shape {tuple(input_shape)} has unknown size, so "
                    "the per-channel range cannot be built. Give the model "
                    "input a full shape, e.g. `keras.Input(shape=(32, 32, 3))`, "
                    "or pick another axis."
                )
            shape = (int(channels),)
            self.input_spec = keras.layers.InputSpec(
                ndim=self._rank, axes={self._channel_axis: int(channels)}
            )
        self.min_val = self.add_state("min_val", shape)
        self.max_val = self.add_state("max_val", shape)
        self.observations = self.add_state("observations", (), dtype="int32")
        self.add_statistic("min", shape, kind="min")
        self.add_statistic("max", shape, kind="max")

    def call(self, inputs: Tensor, training: bool | Tensor | None = None) -> Tensor:
        if 0 in tuple(inputs.shape):
            # An empty batch has no range to observe and nothing to round.
            return ops.cast(inputs, self.compute_dtype)
        x = ops.cast(inputs, "float32")
        if self.may_update(training):
            self._observe(x, training)

        # The stored range, read after the commit: it includes this batch
        # when the layer updated, as PyTorch observes before it quantizes.
        scale, zero_point = self._qparams()
        scale = self._broadcast(scale)
        zero_point = self._broadcast(zero_point)
        q = ops.round(x * (1.0 / scale)) + zero_point
        inside = ops.logical_and(q >= self.quant_min, q <= self.quant_max)
        quantized = (ops.clip(q, self.quant_min, self.quant_max) - zero_point) * scale
        # Straight-through inside the range: the forward value is exactly
        # `quantized` (x - x == 0), the gradient 1 inside and 0 outside.
        outputs = ops.stop_gradient(quantized) + ops.where(
            inside, x - ops.stop_gradient(x), 0.0
        )
        has_range = _backend.read_value(self.observations) > 0
        outputs = ops.where(has_range, outputs, x)
        if self.compute_dtype == "float16":
            # The level nearest float16's max may lie just beyond it.
            outputs = ops.clip(outputs, -65504.0, 65504.0)
        return ops.cast(outputs, self.compute_dtype)

    def _observe(self, x: Tensor, training: bool | Tensor) -> None:
        """Move the stored range towards this batch's (all replicas') range."""
        observed = ops.stop_gradient(x)
        if self._channel_axis is None:
            batch_min, batch_max = ops.min(observed), ops.max(observed)
        else:
            reduce = tuple(i for i in range(self._rank) if i != self._channel_axis)
            batch_min = ops.min(observed, axis=reduce)
            batch_max = ops.max(observed, axis=reduce)
        window = self.accumulate(
            {
                "min": distributed.cross_replica_min(batch_min),
                "max": distributed.cross_replica_max(batch_max),
            },
            training=training,
        )
        batch_min, batch_max = window["min"], window["max"]
        first = _backend.read_value(self.observations) == 0
        self.commit_state(
            (self.min_val, self._moving(self.min_val, batch_min, first)),
            (self.max_val, self._moving(self.max_val, batch_max, first)),
            (self.observations, next_count(self.observations)),
            training=training,
        )

    def quantization_parameters(self) -> tuple[Tensor, Tensor]:
        """The `(scale, zero_point)` of the stored range.

        Returns:
            A float32 `scale` and an int32 `zero_point`, of shape `()` per
            tensor or `(channels,)` per channel. Before the first training
            batch they are PyTorch's defaults, 1.0 and 0.
        """
        if self.min_val is None:
            raise ValueError(
                f"Layer '{self.name}' is not built yet, so it has no range. "
                "Call it on a batch first, e.g. `layer(x, training=True)`."
            )
        scale, zero_point = self._qparams()
        has_range = _backend.read_value(self.observations) > 0
        scale = ops.where(has_range, scale, 1.0)
        zero_point = ops.where(has_range, zero_point, 0.0)
        return scale, ops.cast(zero_point, "int32")

    def compute_output_shape(
        self, input_shape: tuple[int | None, ...]
    ) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_bits": self.num_bits,
            "scheme": self.scheme,
            "axis": self.axis,
            "averaging_constant": self.averaging_constant,
            "quant_min": self.quant_min,
            "quant_max": self.quant_max,
        }

    # --------------------------------------------------------------- helpers

    def _moving(self, variable: keras.Variable, batch: Tensor, first: Tensor) -> Tensor:
        old = _backend.read_value(variable)
        moved = old + self.averaging_constant * (batch - old)
        return ops.where(first, batch, moved)

    def _qparams(self) -> tuple[Tensor, Tensor]:
        """Scale and zero point (as float32) of the stored range, PyTorch's rule."""
        min_neg = ops.minimum(_backend.read_value(self.min_val), 0.0)
        max_pos = ops.maximum(_backend.read_value(self.max_val), 0.0)
        levels = float(self.quant_max - self.quant_min)
        if self.scheme == "symmetric":
            scale = _divide(ops.maximum(-min_neg, max_pos), levels / 2)
            scale = ops.maximum(scale, _EPS)
            return scale, ops.zeros_like(scale)
        scale = ops.maximum(_divide(max_pos - min_neg, levels), _EPS)
        zero_point = ops.clip(
            self.quant_min - ops.round(min_neg / scale), self.quant_min, self.quant_max
        )
        return scale, zero_point

    def _broadcast(self, value: Tensor) -> Tensor:
        """A per-channel `(C,)` value shaped to broadcast against the input."""
        if self._channel_axis is None:
            return value
        shape = [1] * self._rank
        shape[self._channel_axis] = -1
        return ops.reshape(value, shape)


def _divide(numerator: Tensor, denominator: float) -> Tensor:
    """`numerator / denominator`, correctly rounded as in PyTorch.

    XLA rewrites a division by a broadcast constant into a multiplication by
    its reciprocal, which can be off by one unit in the last place; a
    divisor that depends on the numerator keeps the true division. (For a
    finite numerator `0 * numerator` is 0; the state is finite.)
    """
    return numerator / (denominator + 0.0 * numerator)
