"""`SyncBatchNormalization`: batch normalization over the global batch."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_stateful import _backend, distributed
from keras_stateful.layers import _checks
from keras_stateful.layers._moments import ema
from keras_stateful.stateful_layer import StatefulLayer
from keras_stateful.types import Tensor

_EXAMPLE = "SyncBatchNormalization(momentum=0.99, epsilon=1e-3)"


@keras.saving.register_keras_serializable(package="keras_stateful")
class SyncBatchNormalization(StatefulLayer):
    """Batch normalization with the moments of the global batch, on every backend.

    `keras.layers.BatchNormalization`, except that in training the mean and
    variance are those of the whole batch over all replicas of a
    data-parallel run, whatever each replica holds (unequal batches
    included). With `x` the inputs in float32, the sums over every axis but
    `axis` (masked values left out), and `Σ_r` the sum over replicas
    (`keras_stateful.distributed.cross_replica_sum`, differentiable):

    - `n = Σ_r count`, `μ = Σ_r sum(x) / n`, `σ² = Σ_r sum((x - μ)²) / n`
      (the biased variance, as Keras's; centred, so a large common offset
      does not cancel the variance away)
    - `outputs = gamma * (x - μ) / sqrt(σ² + epsilon) + beta`
    - `moving_mean = momentum * moving_mean + (1 - momentum) * μ`
    - `moving_variance = momentum * moving_variance + (1 - momentum) * σ²`

    In inference the moving statistics take the place of `μ` and `σ²` and
    nothing is communicated. Gradients flow through `μ` and `σ²` to every
    replica's inputs: the input gradient on a replica is that of the global
    loss (the sum of the replicas' losses), as with `torch.nn.SyncBatchNorm`.

    - TensorFlow in a `tf.distribute` replica step: an all-reduce of the
      sums and counts (Keras's `BatchNormalization(synchronized=True)` works
      on TensorFlow only, keras-team/keras#18667).
    - PyTorch under DDP (`torch.distributed`): the same all-reduce, with an
      all-reduced backward pass. `torch.nn.SyncBatchNorm` needs a GPU;
      this layer runs on CPU (gloo) too.
    - JAX with `keras.distribution`: the batch is one global array, so its
      moments are already global.
    - One device: `keras.layers.BatchNormalization`'s numbers, at the same
      cost (no communication).

    Torch's `BatchNorm(momentum=p)` keeps `running_mean` as this layer does
    with `momentum=1 - p`; its `running_var` is built from the unbiased
    batch variance (`σ² * n / (n - 1)`).

    **`trainable=False`** makes the layer run in inference mode (moving
    statistics, no update), as Keras's `BatchNormalization` does; recompile
    after changing it. `freeze_state()` stops only the updates of the
    moving statistics while training still uses the batch's.

    Args:
        axis: The feature axis (an int). Defaults to `-1`.
        momentum: Weight of the old moving value, in `[0, 1)`. Defaults to
            `0.99`.
        epsilon: Added to the variance. Defaults to `1e-3`.
        center: Whether to add the trainable offset `beta`. Defaults to
            `True`.
        scale: Whether to multiply by the trainable `gamma`. Defaults to
            `True`.
        beta_initializer: Defaults to `"zeros"`.
        gamma_initializer: Defaults to `"ones"`.
        moving_mean_initializer: Defaults to `"zeros"`.
        moving_variance_initializer: Defaults to `"ones"`.
        beta_regularizer: Defaults to `None`.
        gamma_regularizer: Defaults to `None`.
        beta_constraint: Defaults to `None`.
        gamma_constraint: Defaults to `None`.
        synchronized: Accepted for `BatchNormalization`'s signature; only
            `True` (always synchronized). Defaults to `True`.
        renorm: Accepted for `BatchNormalization`'s signature; only `False`
            (batch renormalization is not supported). Defaults to `False`.
        **kwargs: `StatefulLayer` arguments (`guard_non_finite`, `name`, ...).

    Call arguments:
        inputs: A tensor of rank 2 or more.
        training: Whether to normalize with the global batch's moments and
            update the moving statistics.
        mask: Optional boolean mask of shape `inputs.shape[:-1]`; masked
            values are left out of the moments.

    Example:

    ```python
    bn = keras_stateful.layers.SyncBatchNormalization(momentum=0.9)
    x = np.random.normal(3.0, 2.0, (64, 4)).astype("float32")
    y = bn(x, training=True)  # mean ~0, variance ~1 per feature
    bn.moving_mean  # ~0.3 = 0.1 * 3.0 after one step
    ```

    Reference:
        - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167)
        - [`torch.nn.SyncBatchNorm`](https://pytorch.org/docs/stable/generated/torch.nn.SyncBatchNorm.html)
        - [`keras.layers.BatchNormalization`](https://keras.io/api/layers/normalization_layers/batch_normalization/)
    """

    # Its state is read only as the old value of the moving averages (an EMA
    # against a Python momentum, which autograd does not save) and, for a
    # tensor `training`, after the commit: nothing to protect.
    _state_reads_need_protection = False

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        synchronized: bool = True,
        renorm: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if synchronized is not True:
            raise ValueError(
                "SyncBatchNormalization always uses the global batch; received "
                f"synchronized={synchronized!r}. For per-replica moments write "
                "`keras.layers.BatchNormalization(...)` instead."
            )
        if renorm is not False:
            raise ValueError(
                "SyncBatchNormalization does not implement batch "
                f"renormalization; received renorm={renorm!r}. Write "
                f"`{_EXAMPLE}` (renorm=False)."
            )
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise ValueError(
                f"SyncBatchNormalization: axis must be an int (the feature "
                f"axis); received axis={axis!r}. Write e.g. `axis=-1`."
            )
        self.axis = axis
        self.momentum = _checks.momentum(
            momentum, layer="SyncBatchNormalization", example=_EXAMPLE
        )
        self.epsilon = _checks.number(
            epsilon,
            "epsilon",
            layer="SyncBatchNormalization",
            example=_EXAMPLE,
            exclusive_minimum=0.0,
        )
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(
            moving_variance_initializer
        )
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.supports_masking = True
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self._reduction_axes: list[int] = []

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        rank = len(input_shape)
        if not -rank <= self.axis < rank or self.axis % rank == 0:
            raise ValueError(
                f"Layer '{self.name}': axis={self.axis} does not fit an input of "
                f"rank {rank} (axis 0 is the batch). Write e.g. `axis=-1`."
            )
        axis = self.axis % rank
        features = input_shape[axis]
        if features is None:
            raise ValueError(
                f"Layer '{self.name}': the feature axis {self.axis} must have a "
                f"known size; received input shape {tuple(input_shape)}."
            )
        shape = (int(features),)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                autocast=False,
            )
        self.moving_mean = self.add_state(
            "moving_mean", shape, self.moving_mean_initializer
        )
        self.moving_variance = self.add_state(
            "moving_variance", shape, self.moving_variance_initializer
        )
        self.input_spec = keras.layers.InputSpec(ndim=rank, axes={axis: shape[0]})
        self._reduction_axes = [a for a in range(rank) if a != axis]

    def call(
        self,
        inputs: Tensor,
        training: bool | Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        x = inputs
        if keras.backend.standardize_dtype(x.dtype) not in ("float32", "float64"):
            x = ops.cast(x, "float32")  # statistics in float32 at least
        if not self.may_update(training):
            mean, variance = self._moving_moments(x.dtype)
        else:
            batch_mean, batch_variance = self._global_moments(x, mask)
            self.commit_state(
                (self.moving_mean, ema(self.moving_mean, batch_mean, self.momentum)),
                (
                    self.moving_variance,
                    ema(self.moving_variance, batch_variance, self.momentum),
                ),
                training=training,
            )
            mean, variance = batch_mean, batch_variance
            if ops.is_tensor(training):
                # Read after the commit: the stored values, new only where
                # `training` holds, and then not chosen.
                moving_mean, moving_variance = self._moving_moments(x.dtype)
                mean = ops.where(training, batch_mean, moving_mean)
                variance = ops.where(training, batch_variance, moving_variance)
        outputs = ops.batch_normalization(
            x,
            mean,
            variance,
            axis=self.axis,
            offset=None if self.beta is None else ops.cast(self.beta, x.dtype),
            scale=None if self.gamma is None else ops.cast(self.gamma, x.dtype),
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)

    def _moving_moments(self, dtype: str) -> tuple[Tensor, Tensor]:
        return (
            ops.cast(self.moving_mean, dtype),
            ops.cast(self.moving_variance, dtype),
        )

    def _global_moments(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Mean and biased variance over the global batch, with gradients."""
        axes = self._reduction_axes
        features = x.shape[self.axis]
        if mask is None and not distributed.communicates():
            return self._local_moments(x)
        if mask is None:
            weight = None
            per_feature = 1
            for axis in axes:
                per_feature = per_feature * ops.shape(x)[axis]
            values = ops.ones((features,), x.dtype) * ops.cast(per_feature, x.dtype)
        else:
            if len(mask.shape) != len(x.shape) - 1:
                raise ValueError(
                    f"Layer '{self.name}': the mask must have one dimension less "
                    f"than the inputs; received mask.shape={tuple(mask.shape)} "
                    f"and inputs.shape={tuple(x.shape)}."
                )
            weight = ops.cast(ops.expand_dims(mask, -1), x.dtype)
            x_weighted = x * weight
            values = ops.sum(ops.broadcast_to(weight, ops.shape(x)), axis=axes)
        local_sum = ops.sum(x if weight is None else x_weighted, axis=axes)
        # One all-reduce for the sums and the counts.
        totals = distributed.cross_replica_sum(
            ops.concatenate([local_sum, ops.stop_gradient(values)]),
            differentiable=True,
        )
        count = ops.stop_gradient(totals[features:])
        mean = totals[:features] / count
        centred = ops.square(x - self._broadcast(mean, len(x.shape)))
        if weight is not None:
            centred = centred * weight
        m2 = distributed.cross_replica_sum(
            ops.sum(centred, axis=axes), differentiable=True
        )
        return mean, m2 / count

    def _local_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and biased variance of the local batch, with gradients.

        For one device, or JAX's global array: no sums and counts to share.
        The variance is centred, `E[(x - mean)**2]`: it keeps float32's
        precision where the mean is large against the spread (Keras's
        `E[x**2] - E[x]**2` loses about 3% of the variance at values around
        1000 with variance 9). Its gradient through `mean` is
        `-2 E[x - mean] = 0`, so `mean` enters it cut from the gradient:
        the same gradient without the backward pass's full-size negation
        and sum (about a quarter of an eager PyTorch step of the layer).
        """
        mean, variance = _backend.centred_moments(x, tuple(self._reduction_axes))
        features = (x.shape[self.axis],)
        return _backend.reshape(mean, features), _backend.reshape(variance, features)

    def _broadcast(self, vector: Tensor, rank: int) -> Tensor:
        shape = [1] * rank
        shape[self.axis % rank] = -1
        return ops.reshape(vector, shape)

    def compute_output_shape(
        self, input_shape: tuple[int | None, ...]
    ) -> tuple[int | None, ...]:
        return input_shape

    def compute_mask(self, inputs: Tensor, mask: Tensor | None = None) -> Any:
        return mask

    def get_config(self) -> dict[str, Any]:
        serialize = keras.saving.serialize_keras_object
        return {
            **super().get_config(),
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": serialize(self.beta_initializer),
            "gamma_initializer": serialize(self.gamma_initializer),
            "moving_mean_initializer": serialize(self.moving_mean_initializer),
            "moving_variance_initializer": serialize(self.moving_variance_initializer),
            "beta_regularizer": serialize(self.beta_regularizer),
            "gamma_regularizer": serialize(self.gamma_regularizer),
            "beta_constraint": serialize(self.beta_constraint),
            "gamma_constraint": serialize(self.gamma_constraint),
        }
