"""`VectorQuantizerEMA`: the VQ-VAE codebook kept by exponential moving averages."""

from __future__ import annotations

import math
import random
import warnings
from typing import Any

import keras
from keras import ops

from keras_stateful import _backend, distributed, logged_values
from keras_stateful.layers import _checks
from keras_stateful.layers._seeds import SeedValue
from keras_stateful.stateful_layer import StatefulLayer, next_count
from keras_stateful.types import Tensor

# The nearest-code search holds at most this many distances at once (16 MiB
# in float32); a larger (inputs x codes) matrix is searched in chunks of codes.
_SEARCH_ELEMENTS = 2**22
_MIN_CODES_PER_CHUNK = 256


@keras.saving.register_keras_serializable(package="keras_stateful")
class VectorQuantizerEMA(StatefulLayer):
    """Vector quantizer of VQ-VAE whose codebook follows moving averages (Sonnet's).

    Every vector along the last axis of the input is replaced by its nearest
    code `e_k` of the `(K, D)` codebook `layer.embeddings`. The layer returns
    the quantized vectors with the straight-through estimator,
    `x + stop_gradient(q - x)` (the forward value is `q`, the gradient reaches
    `x` unchanged), and adds the commitment loss
    `commitment_cost * mean((stop_gradient(q) - x)^2)` to the model's losses.
    `q` and the loss use the codebook as it was before this step's update.
    The codebook has no gradient and no optimizer: it is state.

    In training, with the inputs flattened to `x_i` (`N x D`), `z_i = argmin_k
    ||x_i - e_k||^2` (computed as `||x||^2 - 2 x E^T + ||e||^2`), decay `g`
    and `counter` the number of updates so far, exactly as DeepMind Sonnet's
    `VectorQuantizerEMA` (both moving averages zero-debiased, hidden values
    starting at zeros):

    - `counter = counter + 1` (int32, stops at 2**31 - 1)
    - `ema_cluster_size_hidden = ema_cluster_size_hidden -
      (ema_cluster_size_hidden - n_k) * (1 - g)`, with `n_k = #{i: z_i = k}`
    - `ema_dw_hidden = ema_dw_hidden - (ema_dw_hidden - s_k) * (1 - g)`, with
      `s_k = sum_{i: z_i = k} x_i`
    - `ema_cluster_size = ema_cluster_size_hidden / (1 - g**counter)`, and
      `ema_dw = ema_dw_hidden / (1 - g**counter)` (`N_k` and `M_k`)
    - `n = sum_k N_k`; `Ñ_k = (N_k + epsilon) / (n + K * epsilon) * n`
      (Laplace smoothing)
    - `embeddings = M_k / Ñ_k`

    As in Sonnet, a code that no input chose in the first training batch has
    `M_k = 0` and moves to the origin. Three options, the ones
    vector-quantize-pytorch's users rely on, change that:

    - `threshold_ema_dead_code=t`: after the update every code with
      `N_k < t` is restarted: its embedding becomes an input vector of the
      current batch drawn uniformly at random (with replacement, from the
      seed kept in the `restart_seed` state, so it works in compiled `fit` on
      every backend and a resumed or reloaded model draws the same vectors),
      `N_k = t` and `M_k = t * embedding` (hidden values to match). The
      restart comes after the moving averages and resets them, so the same
      step's average cannot undo it (encodec#61). A restarted code that
      attracts no input falls below `t` again and is re-seeded at the next
      step. The seed advances only with a committed update. In data-parallel
      training every replica draws the same positions in its own batch and
      the new embedding is the mean of those replicas' vectors, so that all
      replicas keep one codebook. (`restart_threshold`, its former name,
      still works and warns.)
    - `kmeans_init=True`: the first training call runs `kmeans_iters`
      iterations of Lloyd's k-means over the batch's vectors (the global
      batch in data-parallel training), starting from the vectors at
      positions `floor(k * n / K)` of the `n` (repeated when `n < K`; a
      cluster that loses all its vectors keeps its mean). The codebook
      becomes the means and the moving averages agree with them, as if the
      clusters were a first observation: `counter = 1`, `N_k` the cluster
      sizes, `M_k = N_k * mean_k`, hidden values `(1 - g)` times those. The
      batch is then quantized with that codebook and the usual update
      follows, so it averages the batch with the clusters instead of undoing
      them (vector-quantize-pytorch#66). The `initialized` state (saved)
      makes it run once; `reset_state()` clears it. Under gradient
      accumulation the k-means takes the window's first micro-batch. Under
      `tf.distribute` and `torch.distributed` the layer gathers its input
      vectors from all replicas at every training step (the k-means needs
      them on the first one, and TensorFlow allows no collective inside a
      conditional); on one device and on JAX nothing is communicated.
    - `use_cosine_sim=True`: inputs and codes are L2-normalised
      (`x / max(||x||, 1e-12)`), so the nearest code is the one of highest
      cosine similarity; the output, the loss and the averages use the
      normalised inputs, and `embeddings = normalize(M_k / Ñ_k)` after each
      update (restarts and k-means means normalised too).

    The counts and sums are segment sums over the codes (never an `N x K`
    one-hot), summed over replicas before the update, and the search holds
    about 4.2 million distances at a time at most (a larger `N x K` is
    searched in chunks of codes, in a loop). Statistics and state are float32
    whatever the input dtype; the output has the layer's compute dtype.

    With the `keras_stateful.LogLayerValues()` callback, the `fit` and
    `evaluate` logs show, per batch and averaged over the epoch (weighted by
    batch size):

    - `{name}_perplexity`: `exp(-sum_k p_k log(p_k + 1e-10))`, `p_k = n_k / N`,
      the codebook perplexity of the batch (as Sonnet reports it);
    - `{name}_usage`: the fraction of the `K` codes chosen by at least one
      input of the batch (per batch, so it is comparable between training
      and validation and needs no threshold);
    - `{name}_commitment_loss`: the loss this layer adds.

    In data-parallel training the batch is the global one; in inference it is
    each replica's own (inference never communicates, so one replica may
    evaluate alone), as Keras's own metrics are on PyTorch.

    **`trainable=False`** stops the updates (recompile after changing it);
    `freeze_state()` stops them while training goes on.

    Args:
        num_embeddings: Number of codes `K`.
        embedding_dim: Size `D` of a code; the last axis of the input.
        commitment_cost: Weight `beta` of the commitment loss. Defaults to
            `0.25`.
        decay: Decay `g` of the moving averages, in `[0, 1)`. Defaults to
            `0.99`.
        epsilon: Laplace smoothing `epsilon` of the counts, `> 0`. Defaults
            to `1e-5`.
        embeddings_initializer: Initializer of the `(K, D)` codebook, also
            used by `reset_state()`. Defaults to `None`: Sonnet's
            `VarianceScaling(distribution="uniform")` of its `(D, K)`
            codebook, i.e. `keras.initializers.VarianceScaling(scale=1.0,
            mode="fan_out", distribution="uniform", seed=seed)` here, uniform
            in `[-sqrt(3 / D), sqrt(3 / D)]`.
        threshold_ema_dead_code: Restart codes whose `ema_cluster_size`
            falls below this value (a moving count of inputs per batch),
            `> 0`. Defaults to `None` (no restart, as in Sonnet).
        kmeans_init: Initialise the codebook by k-means over the first
            training batch. Defaults to `False`.
        kmeans_iters: Lloyd iterations of that k-means, `>= 1`. Defaults to
            `10`.
        use_cosine_sim: L2-normalise inputs and codes. Defaults to `False`.
        seed: Integer seed of the default initializer and of the restarts.
            Defaults to `None`: a seed drawn when the layer is created, so
            `keras.utils.set_random_seed()` makes runs repeatable and
            `reset_state()` restores the same codebook.
        restart_threshold: Deprecated name of `threshold_ema_dead_code`.
            Defaults to `None`.
        **kwargs: `StatefulLayer` arguments (`guard_non_finite`, `name`, ...).

    Call arguments:
        inputs: A float tensor of shape `(batch, ..., embedding_dim)`, e.g.
            an encoder's `(B, H, W, D)` output.
        training: Whether the call is in training mode (updates the codebook).

    Example:

    ```python
    images = keras.Input((8, 8, 3))
    z = keras.layers.Conv2D(64, 3, padding="same")(images)  # encoder: (B, H, W, 64)
    vq = keras_stateful.layers.VectorQuantizerEMA(512, 64, seed=0, name="vq")
    decoder = keras.layers.Conv2D(3, 3, padding="same")
    reconstruction = decoder(vq(z))  # the commitment loss joins the model loss
    model = keras.Model(images, reconstruction)
    model.compile("adam", "mse")
    data = np.random.rand(64, 8, 8, 3)
    history = model.fit(data, data, callbacks=[keras_stateful.LogLayerValues()])
    # history.history: loss, vq_perplexity, vq_usage, vq_commitment_loss
    ```

    Reference:
        - [van den Oord et al., 2017](https://arxiv.org/abs/1711.00937)
          (VQ-VAE; Appendix A.1 for the moving averages), and Sonnet's
          [`VectorQuantizerEMA`](https://github.com/google-deepmind/sonnet/blob/v2/sonnet/src/nets/vqvae.py)
        - vector-quantize-pytorch's
          [`EuclideanCodebook`](https://github.com/lucidrains/vector-quantize-pytorch)
          (`kmeans_init`, `use_cosine_sim`, `threshold_ema_dead_code`)
    """

    def __init__(
        self,
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
        restart_threshold: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        layer = "VectorQuantizerEMA"
        threshold_ema_dead_code, threshold_name = _dead_code_threshold(
            threshold_ema_dead_code, restart_threshold, self.name
        )

        def example(extra: str = "") -> str:
            return f"VectorQuantizerEMA(num_embeddings=512, embedding_dim=64{extra})"

        self.num_embeddings, self.embedding_dim = (
            _checks.integer(value, name, layer=layer, example=example(), minimum=1)
            for name, value in (
                ("num_embeddings", num_embeddings),
                ("embedding_dim", embedding_dim),
            )
        )
        self.commitment_cost = _checks.number(
            commitment_cost,
            "commitment_cost",
            layer=layer,
            example=example(", commitment_cost=0.25"),
            minimum=0.0,
        )
        self.decay = _checks.number(
            decay,
            "decay",
            layer=layer,
            example=example(", decay=0.99"),
            minimum=0.0,
            exclusive_maximum=1.0,
            note="It is the weight of the old average, as in Sonnet.",
        )
        self.epsilon = _checks.number(
            epsilon,
            "epsilon",
            layer=layer,
            example=example(", epsilon=1e-5"),
            exclusive_minimum=0.0,
            meaning="it keeps unused codes from a division by zero",
        )
        self.threshold_ema_dead_code = _checks.optional(
            _checks.number,
            threshold_ema_dead_code,
            threshold_name,
            or_none="None (no restarts)",
            layer=layer,
            example=example(", threshold_ema_dead_code=1.0"),
            exclusive_minimum=0.0,
            meaning="a moving count of inputs per batch",
        )
        self.kmeans_init = _flag(kmeans_init, "kmeans_init", self.name)
        self.kmeans_iters = _checks.integer(
            kmeans_iters,
            "kmeans_iters",
            layer=layer,
            example=example(", kmeans_init=True, kmeans_iters=10"),
            minimum=1,
            meaning="Lloyd iterations over the first training batch",
        )
        self.use_cosine_sim = _flag(use_cosine_sim, "use_cosine_sim", self.name)
        self.seed = _checks.optional(
            _checks.integer,
            seed,
            "seed",
            or_none="None (a seed drawn now)",
            layer=layer,
            example=example(", seed=0"),
        )
        seed = self.seed
        if embeddings_initializer is None:
            embeddings_initializer = keras.initializers.VarianceScaling(
                scale=1.0, mode="fan_out", distribution="uniform", seed=seed
            )
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        # The restarts draw from `restart_seed`, a state variable: saved with
        # the weights (a resumed run draws the same vectors) and advanced
        # only with a committed update.
        self._first_seed = seed if seed is not None else random.randint(1, 10**9)
        self.restart_seed = None
        self.embeddings = None
        self.ema_cluster_size = None
        self.ema_dw = None
        self.ema_cluster_size_hidden = None
        self.ema_dw_hidden = None
        self.counter = None
        self.initialized = None
        for key in ("perplexity", "usage", "commitment_loss"):
            self.add_logged_value(f"{self.name}_{key}")

    def build(self, input_shape: Any) -> None:
        self._check_shape(tuple(input_shape))
        codes, dim = self.num_embeddings, self.embedding_dim
        initializer = self.embeddings_initializer
        if self.use_cosine_sim:
            initializer = _UnitRows(initializer)
        self.embeddings = self.add_state(
            "embeddings", (codes, dim), initializer=initializer
        )
        self.ema_cluster_size = self.add_state("ema_cluster_size", (codes,))
        self.ema_dw = self.add_state("ema_dw", (codes, dim))
        self.ema_cluster_size_hidden = self.add_state(
            "ema_cluster_size_hidden", (codes,)
        )
        self.ema_dw_hidden = self.add_state("ema_dw_hidden", (codes, dim))
        self.counter = self.add_state("counter", (), dtype="int32")
        if self.threshold_ema_dead_code is not None:
            first_seed = self._first_seed

            def seed_initializer(shape: Any, dtype: Any = None) -> Tensor:
                return ops.convert_to_tensor([first_seed, 0], dtype=dtype)

            self.restart_seed = self.add_state(
                "restart_seed",
                (2,),
                initializer=seed_initializer,
                dtype=_backend.SEED_DTYPE,
            )
        if self.kmeans_init:
            self.initialized = self.add_state("initialized", (), dtype="bool")
        self.add_statistic("counts", (codes,))
        self.add_statistic("sums", (codes, dim))

    def call(self, inputs: Tensor, training: bool | Tensor | None = None) -> Tensor:
        shape = tuple(inputs.shape)
        self._check_shape(shape)
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if not keras.backend.is_float_dtype(dtype):
            raise TypeError(
                f"Layer '{self.name}': inputs must be floating point vectors; "
                f"received dtype {dtype}. Cast them first, e.g. "
                '`ops.cast(x, "float32")`, or embed integer ids with '
                "`keras.layers.Embedding`."
            )
        x = ops.cast(inputs, "float32")
        if any(dim == 0 for dim in shape[:-1]):
            # No vectors: nothing to quantize, to log or to update.
            self.add_loss(ops.sum(x) * 0.0)
            return ops.cast(x, self.compute_dtype)

        if self.use_cosine_sim:
            x = _unit_rows(x)
        flat = ops.stop_gradient(ops.reshape(x, (-1, self.embedding_dim)))
        updating = self.may_update(training)
        if updating and self.kmeans_init:
            self._initialize_once(flat, training)

        # Search and loss with the codebook before the update (after the
        # k-means initialisation, on the first training batch).
        embeddings = _backend.read_value(self.embeddings)
        codes = self._nearest_codes(flat, embeddings)
        quantized = ops.reshape(ops.take(embeddings, codes, axis=0), ops.shape(x))
        loss = self.commitment_cost * ops.mean(
            ops.square(ops.stop_gradient(quantized) - x)
        )
        self.add_loss(loss)
        outputs = x + ops.stop_gradient(quantized - x)

        # Code counts over all replicas' batches in training (the update and
        # the logged perplexity and usage need them) and in an evaluation
        # that every replica takes part in; otherwise over this replica's
        # batch, so that no replica waits for another.
        counts, sums = self._code_statistics(flat, codes, with_sums=updating)
        if updating or logged_values.evaluating_on_all_replicas():
            counts = distributed.cross_replica_sum(counts)
        batch = ops.shape(inputs)[0]
        self._log(counts, loss, batch)
        if updating:
            window = self.accumulate(
                {"counts": counts, "sums": distributed.cross_replica_sum(sums)},
                training=training,
            )
            self._update(window["sums"], window["counts"], flat, training)
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "commitment_cost": self.commitment_cost,
            "decay": self.decay,
            "epsilon": self.epsilon,
            "embeddings_initializer": keras.initializers.serialize(
                self.embeddings_initializer
            ),
            "threshold_ema_dead_code": self.threshold_ema_dead_code,
            "kmeans_init": self.kmeans_init,
            "kmeans_iters": self.kmeans_iters,
            "use_cosine_sim": self.use_cosine_sim,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VectorQuantizerEMA:
        # Files saved before the rename hold `restart_threshold`: load them
        # quietly (their owner cannot edit them).
        config = dict(config)
        legacy = config.pop("restart_threshold", None)
        if legacy is not None and config.get("threshold_ema_dead_code") is None:
            config["threshold_ema_dead_code"] = legacy
        return super().from_config(config)

    @property
    def restart_threshold(self) -> float | None:
        """Deprecated name of `threshold_ema_dead_code`."""
        return self.threshold_ema_dead_code

    # ------------------------------------------------------------- the steps

    def _nearest_codes(self, flat: Tensor, embeddings: Tensor) -> Tensor:
        """`argmin_k ||x_i - e_k||^2` as int32 `(N,)`, first index on ties."""
        codes = self.num_embeddings
        x_sq = ops.sum(ops.square(flat), axis=1, keepdims=True)
        e_sq = ops.sum(ops.square(embeddings), axis=1)
        # -2 x E^T as (-2 x) E^T: the same numbers (a power of 2 scales
        # exactly), one pass over N x K less where nothing fuses (PyTorch).
        minus_2x = -2.0 * flat
        per_chunk = self._codes_per_chunk(flat.shape[0])
        if per_chunk >= codes:
            distances = (
                x_sq + ops.matmul(minus_2x, ops.transpose(embeddings)) + e_sq[None, :]
            )
            return ops.cast(ops.argmin(distances, axis=1), "int32")

        # Interleaved chunks: chunk c holds the codes p * chunks + c. The
        # codebook is reshaped to (per_chunk, chunks, D) and a chunk is a slice
        # along the second axis, so a codebook sharded along its first axis
        # (keras.distribution.ModelParallel) is searched where it lies, never
        # gathered. Codes are padded (at infinite distance) only when K has no
        # suitable divisor. Ties go to the lower code, as argmin's first index.
        chunks = self._search_chunks(-(-codes // per_chunk))
        per_chunk = -(-codes // chunks)
        pad = chunks * per_chunk - codes
        if pad:
            embeddings = ops.concatenate(
                [embeddings, ops.zeros((pad, self.embedding_dim), "float32")], axis=0
            )
            e_sq = ops.concatenate([e_sq, ops.full((pad,), math.inf, "float32")])
        embeddings = ops.reshape(embeddings, (per_chunk, chunks, self.embedding_dim))
        e_sq = ops.reshape(e_sq, (per_chunk, chunks))
        stride = ops.arange(per_chunk, dtype="int32") * chunks

        def search(chunk: Any, best: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            best_distance, best_code = best
            block = ops.take(embeddings, chunk, axis=1)
            distances = (
                x_sq
                + ops.matmul(minus_2x, ops.transpose(block))
                + ops.take(e_sq, chunk, axis=1)[None, :]
            )
            position = ops.cast(ops.argmin(distances, axis=1), "int32")
            distance = ops.take_along_axis(distances, position[:, None], axis=1)[:, 0]
            code = ops.take(stride, position) + ops.cast(chunk, "int32")
            nearer = ops.logical_or(
                distance < best_distance,
                ops.logical_and(distance == best_distance, code < best_code),
            )
            return (
                ops.where(nearer, distance, best_distance),
                ops.where(nearer, code, best_code),
            )

        start = ops.zeros_like(x_sq[:, 0])
        best = (start + math.inf, ops.cast(start, "int32"))
        return ops.fori_loop(0, chunks, search, best)[1]

    def _search_chunks(self, fewest: int) -> int:
        """How many chunks the search takes: at least `fewest`, a divisor of K.

        Among the divisors of K in `[fewest, 4 * fewest]`, the one that leaves
        the most factors of 2 in K / chunks (a codebook split over 2, 4, 8...
        devices then splits each chunk the same way), the fewest chunks on a
        tie. Without such a divisor, `fewest` (the codes are padded).
        """
        codes = self.num_embeddings

        def twos(n: int) -> int:
            return (n & -n).bit_length()

        divisors = [c for c in range(fewest, 4 * fewest + 1) if codes % c == 0]
        if not divisors:
            return fewest
        return max(divisors, key=lambda c: (twos(codes // c), -c))

    def _codes_per_chunk(self, rows: int | None) -> int:
        if rows is None:
            return max(_SEARCH_ELEMENTS // 4096, _MIN_CODES_PER_CHUNK)
        return max(_SEARCH_ELEMENTS // max(int(rows), 1), _MIN_CODES_PER_CHUNK)

    def _code_statistics(
        self, flat: Tensor, codes: Tensor, *, with_sums: bool
    ) -> tuple[Tensor, Tensor | None]:
        """`n_k` `(K,)` and, if asked, `s_k` `(K, D)`, by segment sums."""
        counts = ops.segment_sum(
            ops.ones_like(codes, dtype="float32"), codes, self.num_embeddings
        )
        sums = ops.segment_sum(flat, codes, self.num_embeddings) if with_sums else None
        return counts, sums

    def _log(self, counts: Tensor, loss: Tensor, batch: Any) -> None:
        probs = counts / ops.maximum(ops.sum(counts), 1.0)
        perplexity = ops.exp(-ops.sum(probs * ops.log(probs + 1e-10)))
        usage = ops.mean(ops.cast(counts > 0, "float32"))
        self.log_value(f"{self.name}_perplexity", perplexity, count=batch)
        self.log_value(f"{self.name}_usage", usage, count=batch)
        self.log_value(f"{self.name}_commitment_loss", loss, count=batch)

    def _initialize_once(self, flat: Tensor, training: Any) -> None:
        """K-means over the first training batch; the EMAs set to agree with it.

        Committed before the search, so that this batch is quantized with
        the new codebook. Once `initialized` holds, the state is recommitted
        as it is (a copy): `ops.cond` picks the values, the commit follows.
        The batch is gathered from the replicas outside the conditional, on
        every step: TensorFlow allows no collective inside one.
        """
        names = (
            "embeddings",
            "ema_cluster_size",
            "ema_dw",
            "ema_cluster_size_hidden",
            "ema_dw_hidden",
            "counter",
        )
        current = tuple(_backend.read_value(getattr(self, n)) for n in names)
        initialized = ops.cast(_backend.read_value(self.initialized), "bool")
        data, valid = distributed.cross_replica_gather(flat)

        def keep() -> tuple[Tensor, ...]:
            return current

        def initialize() -> tuple[Tensor, ...]:
            means, sizes = self._kmeans(data, valid)
            rate = 1.0 - ops.convert_to_tensor(self.decay, "float32")
            dw = means * sizes[:, None]
            # As if the k-means clusters were the first EMA observation:
            # counter 1, hidden = (1 - g) * average, so that the next step
            # averages this batch with them instead of replacing them.
            counter = ops.ones((), "int32")
            return (means, sizes, dw, rate * sizes, rate * dw, counter)

        values = ops.cond(initialized, keep, initialize)
        self.commit_state(
            *zip((getattr(self, n) for n in names), values, strict=True),
            (self.initialized, ops.ones((), "bool")),
            training=training,
        )

    def _kmeans(self, data: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """Lloyd's k-means over the valid rows of `data`: means `(K, D)`, sizes.

        The K starting means are the rows at positions `floor(k * n / K)` of
        the `n` valid rows in order (every row once if `n == K`, repeated if
        `n < K`): no draw, so one device and any split of the batch over
        replicas start alike. A cluster that loses all its rows keeps its
        mean. The sizes are those of the last assignment.
        """
        codes = self.num_embeddings
        rows = ops.shape(data)[0]
        index = ops.arange(rows, dtype="int32")
        if valid is None:
            weights = ops.ones((rows,), "float32")
            order = index
        else:
            weights = ops.cast(valid, "float32")
            # The valid rows first, in their order (padding rows last).
            order = ops.argsort(ops.where(valid, index, index + rows))
        n = ops.sum(weights)
        k = ops.arange(codes, dtype="float32")
        positions = ops.cast(ops.floor((k * n + 0.5) / codes), "int32")
        means = ops.take(data, ops.take(order, positions), axis=0)
        weighted = data * weights[:, None]

        def lloyd(_: Any, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            means, _ = state
            nearest = self._nearest_codes(data, means)
            sizes = ops.segment_sum(weights, nearest, codes)
            sums = ops.segment_sum(weighted, nearest, codes)
            new = sums / ops.maximum(sizes, 1.0)[:, None]
            if self.use_cosine_sim:
                new = _unit_rows(new)
            return ops.where(sizes[:, None] > 0, new, means), sizes

        return ops.fori_loop(
            0, self.kmeans_iters, lloyd, (means, ops.zeros((codes,), "float32"))
        )

    def _update(
        self, sums: Tensor, counts: Tensor, flat: Tensor, training: Any
    ) -> None:
        decay = ops.convert_to_tensor(self.decay, "float32")
        keep = 1.0 - decay  # the float32 decay the debiasing uses too
        counter = next_count(self.counter)
        size_hidden = _backend.read_value(self.ema_cluster_size_hidden)
        dw_hidden = _backend.read_value(self.ema_dw_hidden)
        size_hidden = size_hidden - (size_hidden - counts) * keep
        dw_hidden = dw_hidden - (dw_hidden - sums) * keep
        debias = 1.0 - ops.power(decay, ops.cast(counter, "float32"))
        cluster_size = size_hidden / debias
        dw = dw_hidden / debias
        total = ops.sum(cluster_size)
        smoothed = (
            (cluster_size + self.epsilon)
            / (total + self.num_embeddings * self.epsilon)
            * total
        )
        embeddings = dw / smoothed[:, None]
        if self.use_cosine_sim:
            embeddings = _unit_rows(embeddings)

        extra: list[tuple[keras.Variable, Tensor]] = []
        if self.restart_seed is not None:
            # After this step's EMA, so that the EMA cannot undo the restart
            # (encodec#61): the dead codes' averages are reset with them.
            threshold = self.threshold_ema_dead_code
            dead = cluster_size < threshold
            seeds, next_seed = self._restart_vectors(flat)
            embeddings = ops.where(dead[:, None], seeds, embeddings)
            cluster_size = ops.where(dead, threshold, cluster_size)
            dw = ops.where(dead[:, None], threshold * seeds, dw)
            size_hidden = ops.where(dead, threshold * debias, size_hidden)
            dw_hidden = ops.where(dead[:, None], threshold * debias * seeds, dw_hidden)
            extra.append((self.restart_seed, next_seed))

        self.commit_state(
            (self.embeddings, embeddings),
            (self.ema_cluster_size, cluster_size),
            (self.ema_dw, dw),
            (self.ema_cluster_size_hidden, size_hidden),
            (self.ema_dw_hidden, dw_hidden),
            (self.counter, counter),
            *extra,
            training=training,
        )

    def _restart_vectors(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """A batch vector per code (`(K, D)`), and the seed that follows."""
        rows = ops.cast(ops.shape(flat)[0], "float32")
        # Draw from the generator's current seed, and advance it only
        # with the update: a frozen or skipped step leaves it alone.
        seed = _backend.read_value(self.restart_seed)
        draw = keras.random.uniform((self.num_embeddings,), seed=SeedValue(seed))
        next_seed = seed + ops.convert_to_tensor([0, 1], dtype=seed.dtype)
        picks = ops.minimum(
            ops.cast(ops.floor(draw * rows), "int32"),
            ops.cast(rows, "int32") - 1,
        )
        # Identical on every replica: the mean over replicas of the row
        # each one drew (on one device, the row itself).
        replicas = distributed.cross_replica_sum(ops.ones((), "float32"))
        seeds = distributed.cross_replica_sum(ops.take(flat, picks, axis=0))
        seeds = seeds / replicas
        if self.use_cosine_sim:
            seeds = _unit_rows(seeds)
        return seeds, next_seed

    # ---------------------------------------------------------------- checks

    def _check_shape(self, shape: tuple[Any, ...]) -> None:
        if len(shape) >= 2 and shape[-1] == self.embedding_dim:
            return
        hint = ""
        if len(shape) >= 2 and shape[-1] == self.num_embeddings:
            hint = (
                " The arguments are (num_embeddings, embedding_dim), in that "
                "order (Sonnet's are the other way round)."
            )
        raise ValueError(
            f"Layer '{self.name}': inputs must have shape (batch, ..., "
            f"{self.embedding_dim}), vectors of embedding_dim="
            f"{self.embedding_dim} along the last axis; received shape "
            f"{shape}. Project them first, e.g. `keras.layers.Dense("
            f"{self.embedding_dim})(x)` or a 1x1 convolution.{hint}"
        )


# ------------------------------------------------------------------- helpers


def _unit_rows(x: Tensor) -> Tensor:
    """`x / max(||x||, 1e-12)` along the last axis (PyTorch's F.normalize)."""
    norm = ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True))
    return x / ops.maximum(norm, 1e-12)


class _UnitRows:
    """An initializer whose rows are those of `initializer`, L2-normalised."""

    def __init__(self, initializer: Any) -> None:
        self.initializer = initializer

    def __call__(self, shape: Any, dtype: Any = None) -> Tensor:
        return _unit_rows(ops.cast(self.initializer(shape, dtype=dtype), "float32"))


def _flag(value: Any, name: str, layer: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(
            f"Layer '{layer}': {name} must be True or False; received "
            f"{value!r}. Write e.g. `VectorQuantizerEMA(512, 64, {name}=True)`."
        )
    return value


def _dead_code_threshold(
    threshold: float | None, restart_threshold: float | None, layer: str
) -> tuple[float | None, str]:
    """`threshold_ema_dead_code`, from its deprecated alias if need be, and
    the name the caller used (for error messages)."""
    if restart_threshold is None:
        return threshold, "threshold_ema_dead_code"
    if threshold is not None:
        raise ValueError(
            f"Layer '{layer}': received both threshold_ema_dead_code="
            f"{threshold!r} and restart_threshold={restart_threshold!r}, two "
            "names of the same setting. Write only `threshold_ema_dead_code="
            f"{threshold!r}`."
        )
    warnings.warn(
        f"Layer '{layer}': `restart_threshold` is now named "
        "`threshold_ema_dead_code` (as in vector-quantize-pytorch); write "
        f"`threshold_ema_dead_code={restart_threshold!r}`. The old name "
        "still works, with the same meaning.",
        FutureWarning,
        stacklevel=3,
    )
    return restart_threshold, "restart_threshold"
