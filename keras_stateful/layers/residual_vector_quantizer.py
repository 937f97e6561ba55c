"""`ResidualVectorQuantizer`: a stack of EMA codebooks, each on the last residual."""

from __future__ import annotations

import random
from typing import Any

import keras
from keras import ops

from keras_stateful.layers import _checks
from keras_stateful.layers.vector_quantizer_ema import VectorQuantizerEMA
from keras_stateful.stateful_layer import StatefulLayer
from keras_stateful.types import Tensor

# The arguments handed to every stage, with their defaults.
_STAGE_ARGUMENTS = {
    "commitment_cost": 0.25,
    "decay": 0.99,
    "epsilon": 1e-5,
    "embeddings_initializer": None,
    "threshold_ema_dead_code": None,
    "kmeans_init": False,
    "kmeans_iters": 10,
    "use_cosine_sim": False,
}


@keras.saving.register_keras_serializable(package="keras_stateful")
class ResidualVectorQuantizer(StatefulLayer):
    """Residual vector quantizer of SoundStream and EnCodec, on EMA codebooks.

    A stack of `num_quantizers` `VectorQuantizerEMA` stages, `layer.quantizers`.
    With `r_0 = x` (the input vectors, float32):

    - `q_i = e^(i)_{z_i}`, the nearest code of stage `i` to `r_i`, from its
      codebook before this step's update;
    - `r_{i+1} = r_i - q_i` (the next stage quantizes what is left);
    - the output is `x + stop_gradient(sum_i q_i - x)`: one straight-through
      estimator over the whole stack (the forward value is the sum of the
      stages' codes, the gradient reaches `x` once, unchanged).

    Each stage is a complete `VectorQuantizerEMA` on its residual: it keeps
    its own codebook by Sonnet's zero-debiased moving averages (in training,
    from the `r_i` it quantized), adds its own commitment loss
    `commitment_cost * mean((stop_gradient(q_i) - r_i)^2)` (the model's loss
    gets the sum over stages; the gradient of stage `i`'s loss reaches `x`
    through `r_i`), and logs its own `{stage}_perplexity`, `{stage}_usage`
    and `{stage}_commitment_loss`, the stages being named `{name}_0`,
    `{name}_1`, ... The options of `VectorQuantizerEMA` (`kmeans_init`,
    `use_cosine_sim`, `threshold_ema_dead_code`, ...) apply to every stage;
    with `kmeans_init=True`, stage `i` runs its k-means on the first
    batch's `r_i`, after stage `i - 1` was initialised. Like every stage, the
    stack never builds an `N x K` one-hot. The residuals stay in float32
    under mixed precision (the stages compute in float32); the output has the
    layer's compute dtype.

    **`trainable=False`** stops the updates of every stage (recompile after
    changing it); `freeze_state()` stops them while training goes on.

    Args:
        num_quantizers: Number of stages `Q`.
        num_embeddings: Codes `K` per stage.
        embedding_dim: Size `D` of a code; the last axis of the input.
        commitment_cost: Weight `beta` of each stage's commitment loss.
            Defaults to `0.25`.
        decay: Decay `g` of the moving averages. Defaults to `0.99`.
        epsilon: Laplace smoothing of the counts. Defaults to `1e-5`.
        embeddings_initializer: Initializer of every stage's codebook.
            Defaults to `None`: `VectorQuantizerEMA`'s (Sonnet's), seeded per
            stage.
        threshold_ema_dead_code: Restart a stage's codes whose moving count
            falls below it. Defaults to `None` (no restarts).
        kmeans_init: Initialise each stage by k-means on the first training
            batch. Defaults to `False`.
        kmeans_iters: Lloyd iterations of that k-means. Defaults to `10`.
        use_cosine_sim: L2-normalise each stage's input and codes. Defaults to
            `False`.
        seed: Integer seed; stage `i` gets `seed + i`. Defaults to `None`: a
            seed drawn when the layer is created.
        **kwargs: `StatefulLayer` arguments (`guard_non_finite`,
            `accumulation_steps`, which the stages share, `name`, ...).

    Call arguments:
        inputs: A float tensor of shape `(batch, ..., embedding_dim)`.
        training: Whether the call is in training mode (updates every stage).

    Example:

    ```python
    frames = keras.Input((50, 16))  # e.g. (B, T, D) audio frames
    z = keras.layers.Dense(32)(frames)
    rvq = keras_stateful.layers.ResidualVectorQuantizer(4, 256, 32, seed=0, name="rvq")
    reconstruction = keras.layers.Dense(16)(rvq(z))
    model = keras.Model(frames, reconstruction)
    model.compile("adam", "mse")
    data = np.random.rand(32, 50, 16)
    history = model.fit(data, data, callbacks=[keras_stateful.LogLayerValues()])
    # history.history: loss, and rvq_0_perplexity ... rvq_3_perplexity,
    # with usage and commitment loss per stage
    [stage.name for stage in rvq.quantizers]  # ['rvq_0', 'rvq_1', 'rvq_2', 'rvq_3']
    ```

    Reference:
        - [Zeghidour et al., 2021](https://arxiv.org/abs/2107.03312)
          (SoundStream, Algorithm 1), [Défossez et al., 2022](https://arxiv.org/abs/2210.13438)
          (EnCodec) and vector-quantize-pytorch's
          [`ResidualVQ`](https://github.com/lucidrains/vector-quantize-pytorch)
    """

    def __init__(
        self,
        num_quantizers: int,
        num_embeddings: int,
        embedding_dim: int,
        *,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        embeddings_initializer: Any = None,
        threshold_ema_dead_code: float | None = None,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        use_cosine_sim: bool = False,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_quantizers = _checks.integer(
            num_quantizers,
            "num_quantizers",
            layer="ResidualVectorQuantizer",
            example="ResidualVectorQuantizer(num_quantizers=8, "
            "num_embeddings=1024, embedding_dim=128)",
            minimum=1,
        )
        self.seed = _checks.optional(
            _checks.integer,
            seed,
            "seed",
            or_none="None (a seed drawn now)",
            layer="ResidualVectorQuantizer",
            example="ResidualVectorQuantizer(8, 1024, 128, seed=0)",
        )
        first_seed = self.seed if self.seed is not None else random.randint(1, 10**9)
        stage_arguments = {
            "commitment_cost": commitment_cost,
            "decay": decay,
            "epsilon": epsilon,
            "embeddings_initializer": embeddings_initializer,
            "threshold_ema_dead_code": threshold_ema_dead_code,
            "kmeans_init": kmeans_init,
            "kmeans_iters": kmeans_iters,
            "use_cosine_sim": use_cosine_sim,
        }
        # float32 stages: the residuals are not rounded to a half dtype.
        self.quantizers = [
            VectorQuantizerEMA(
                num_embeddings,
                embedding_dim,
                **stage_arguments,
                seed=first_seed + i,
                guard_non_finite=self.guard_non_finite,
                accumulation_steps=self.accumulation_steps,
                dtype="float32",
                name=f"{self.name}_{i}",
            )
            for i in range(self.num_quantizers)
        ]
        first = self.quantizers[0]
        self.num_embeddings = first.num_embeddings
        self.embedding_dim = first.embedding_dim
        self._stage_config = {key: getattr(first, key) for key in _STAGE_ARGUMENTS}
        self._stage_config["embeddings_initializer"] = embeddings_initializer

    def build(self, input_shape: Any) -> None:
        self._check_shape(tuple(input_shape))
        for stage in self.quantizers:
            stage.build(input_shape)

    def call(self, inputs: Tensor, training: bool | Tensor | None = None) -> Tensor:
        self._check_shape(tuple(inputs.shape))
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if not keras.backend.is_float_dtype(dtype):
            raise TypeError(
                f"Layer '{self.name}': inputs must be floating point vectors; "
                f"received dtype {dtype}. Cast them first, e.g. "
                '`ops.cast(x, "float32")`.'
            )
        x = ops.cast(inputs, "float32")
        residual = x
        total = ops.zeros_like(x)
        for stage in self.quantizers:
            # The stage's output is its straight-through estimator; only its
            # value (the codes) goes on: the stack has one estimator.
            codes = ops.stop_gradient(stage(residual, training=training))
            total = total + codes
            residual = residual - codes
        outputs = x + ops.stop_gradient(total - x)
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = dict(self._stage_config)
        if config["embeddings_initializer"] is not None:
            config["embeddings_initializer"] = keras.initializers.serialize(
                keras.initializers.get(config["embeddings_initializer"])
            )
        return {
            **super().get_config(),
            "num_quantizers": self.num_quantizers,
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            **config,
            "seed": self.seed,
        }

    # ------------------------------------------------- state, through stages

    @property
    def state_variables(self) -> list[keras.Variable]:
        """Every stage's state variables, stage by stage."""
        return [v for stage in self.quantizers for v in stage.state_variables]

    @property
    def skipped_updates(self) -> int:
        """Updates skipped for a non-finite value, summed over the stages."""
        return sum(stage.skipped_updates for stage in self.quantizers)

    def freeze_state(self) -> None:
        super().freeze_state()
        for stage in self.quantizers:
            stage.freeze_state()

    def unfreeze_state(self) -> None:
        super().unfreeze_state()
        for stage in self.quantizers:
            stage.unfreeze_state()

    def reset_state(self) -> None:
        for stage in self.quantizers:
            stage.reset_state()

    def set_accumulation_steps(self, n: int) -> None:
        super().set_accumulation_steps(n)
        for stage in self.quantizers:
            stage.set_accumulation_steps(n)

    def _check_shape(self, shape: tuple[Any, ...]) -> None:
        if len(shape) >= 2 and shape[-1] == self.embedding_dim:
            return
        raise ValueError(
            f"Layer '{self.name}': inputs must have shape (batch, ..., "
            f"{self.embedding_dim}), vectors of embedding_dim="
            f"{self.embedding_dim} along the last axis; received shape "
            f"{shape}. Project them first, e.g. `keras.layers.Dense("
            f"{self.embedding_dim})(x)`. The arguments are (num_quantizers, "
            "num_embeddings, embedding_dim), in that order."
        )
