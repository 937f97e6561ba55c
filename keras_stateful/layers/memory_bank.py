"""`MemoryBank`: the NPID memory of one feature per training sample, row writes only."""

from __future__ import annotations

import math
import random
from typing import Any

import keras
from keras import ops

from keras_stateful import _backend, _torch_buffers, distributed
from keras_stateful.layers import _checks
from keras_stateful.layers._groups import group_by_id
from keras_stateful.layers._seeds import SeedValue
from keras_stateful.stateful_layer import StatefulLayer, next_count
from keras_stateful.types import Tensor


@keras.saving.register_keras_serializable(package="keras_stateful")
class MemoryBank(StatefulLayer):
    """One feature per training sample (NPID's memory bank), moved by momentum.

    Called on `[features, sample_ids]`, it returns the `(num_samples, D)`
    bank as it stood before this batch, for the instance-discrimination (NCE)
    logits, cast to the layer's compute dtype. In training, for each sample
    id `i` in the batch, with `f_i` its features as given (not normalised):

    - `v_i = normalize(m * v_i + (1 - m) * f_i)`, with `m = momentum` and
      `normalize(v) = v / max(||v||, 1e-12)`

    as lemniscate.pytorch's `LinearAverage` does. Only the rows of the ids in
    the batch are computed and written, like `CenterLoss`'s: the update costs
    `O(B log B + B * D)` (a sort of the ids) whatever `num_samples` is.

    **Duplicate ids.** When an id appears more than once in the batch, `f_i`
    is the mean of its features there, and the row moves once: `v_i =
    normalize(m * v_i + (1 - m) * mean_j f_j)`. The rule does not depend on
    the order of the batch, nor on how a data-parallel run splits it; with
    distinct ids (each sample once per epoch) it is NPID's rule exactly.

    **Sampled negatives.** With `num_negatives=k` the layer returns
    `(negatives, negative_ids)` instead: `k` rows of the bank before the
    update, `(k, D)`, at ids `(k,)` drawn uniformly with replacement (as
    NPID's `AliasMethod` over uniform weights), shared by the whole batch;
    `logits = features @ negatives.T`. The ids come from the seed kept in
    the `sampler_seed` state, so they are drawn inside a compiled `fit` on
    every backend, the same on every replica, and a resumed or reloaded
    model draws the same ones. The seed advances only with a committed
    update; an inference call draws from the current seed. A sample's own id
    may be drawn: mask it with `negative_ids` if that matters.

    **Ids out of range.** An id outside `[0, num_samples)` raises a
    `ValueError` when the call runs eagerly (this includes PyTorch's `fit`,
    unless `jit_compile=True`); in compiled code (a traced `fit` step on JAX
    or TensorFlow) such samples update nothing and are counted in the
    `out_of_range_ids` state.

    In data-parallel training the rows of every replica's batch are
    gathered, so every replica writes the same rows. On PyTorch, which
    writes rows in place, the bank returned by a training call is kept by a
    second buffer brought up to date by the rows written last (see
    `MemoryQueue`). A batch with a non-finite feature updates nothing (see
    `guard_non_finite`). In inference nothing changes.

    **`trainable=False`** stops the updates (recompile after changing it);
    `freeze_state()` stops them while training goes on.

    Args:
        num_samples: Number of rows `N`, one per training sample.
        momentum: Weight `m` of the old row. Defaults to `0.5`, NPID's.
        num_negatives: Number `k` of negatives to draw and return instead of
            the whole bank, or `None` for the whole bank. Defaults to `None`.
        seed: Integer seed of the default initializer and of the draws.
            Defaults to `None`: a seed drawn when the layer is created.
        bank_initializer: Initializer of the `(N, D)` bank, also used by
            `reset_state()`. Defaults to `None`: uniform in `[-a, a]`, `a =
            1 / sqrt(D / 3)`, as `LinearAverage` (rows of norm close to 1),
            seeded with `seed`.
        **kwargs: `StatefulLayer` arguments (`guard_non_finite`, `name`, ...).

    Call arguments:
        inputs: `[features, sample_ids]`: features `(B, D)`, the encoder's
            (L2-normalised in NPID) output, and integer ids `(B,)` or
            `(B, 1)` of the samples in the dataset.
        training: Whether the call is in training mode (updates the rows).

    Example:

    ```python
    features = ops.normalize(keras.random.normal((8, 128), seed=1))
    sample_ids = np.arange(8) + 100  # each sample's index in the dataset
    bank = keras_stateful.layers.MemoryBank(50000, momentum=0.5, seed=0)
    memory = bank([features, sample_ids], training=True)  # (50000, 128), before
    logits = ops.matmul(features, ops.transpose(memory)) / 0.07  # label: sample_ids
    # bank.bank[100:108] now holds normalize(0.5 * memory[100:108] + 0.5 * features)
    ```

    Reference:
        - [Wu et al., 2018](https://arxiv.org/abs/1805.01978) (NPID), and its
          [code](https://github.com/zhirongw/lemniscate.pytorch)
          (`LinearAverage`, `NCEAverage`)
    """

    def __init__(
        self,
        num_samples: int,
        momentum: float = 0.5,
        *,
        num_negatives: int | None = None,
        seed: int | None = None,
        bank_initializer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        layer = "MemoryBank"
        self.num_samples = _checks.integer(
            num_samples,
            "num_samples",
            layer=layer,
            example="MemoryBank(50000)",
            minimum=1,
            meaning="one row per training sample",
        )
        self.momentum = _checks.momentum(
            momentum, layer=layer, example="MemoryBank(50000, momentum=0.5)"
        )
        self.num_negatives = _checks.optional(
            _checks.integer,
            num_negatives,
            "num_negatives",
            or_none="None (the whole bank)",
            layer=layer,
            example="MemoryBank(50000, num_negatives=4096)",
            minimum=1,
        )
        self.seed = _checks.optional(
            _checks.integer,
            seed,
            "seed",
            or_none="None (a seed drawn now)",
            layer=layer,
            example="MemoryBank(50000, seed=0)",
        )
        self.bank_initializer = (
            None
            if bank_initializer is None
            else keras.initializers.get(bank_initializer)
        )
        self._first_seed = (
            self.seed if self.seed is not None else random.randint(1, 10**9)
        )
        self.dim: int | None = None
        self.bank = None
        self.sampler_seed = None
        self.out_of_range_ids = None
        self._bank_before = _torch_buffers.ValueBeforeRowWrites()

    def build(self, input_shape: Any) -> None:
        features_shape, _ = self._split_shapes(input_shape)
        if len(features_shape) != 2 or features_shape[-1] is None:
            raise ValueError(self._features_help(features_shape))
        self.dim = int(features_shape[-1])
        initializer = self.bank_initializer
        if initializer is None:
            bound = 1.0 / math.sqrt(self.dim / 3.0)
            initializer = keras.initializers.RandomUniform(
                -bound, bound, seed=self._first_seed
            )
        self.bank = self.add_state(
            "bank", (self.num_samples, self.dim), initializer=initializer
        )
        first_seed = self._first_seed

        def seed_initializer(shape: Any, dtype: Any = None) -> Tensor:
            return ops.convert_to_tensor([first_seed, 0], dtype=dtype)

        self.sampler_seed = self.add_state(
            "sampler_seed",
            (2,),
            initializer=seed_initializer,
            dtype=_backend.SEED_DTYPE,
        )
        self.out_of_range_ids = self.add_state("out_of_range_ids", (), dtype="int32")

    def call(self, inputs: Any, training: bool | Tensor | None = None) -> Any:
        features, sample_ids = self._split_inputs(inputs)
        self._check_features(features)
        ids = self._sample_ids(sample_ids)
        updating = self.may_update(training) and features.shape[0] != 0
        seed = _backend.read_value(self.sampler_seed)

        # What the call returns: the bank (or k rows of it) before the batch.
        # The negatives of a training call are read with the rows the update
        # reads (`_update`), in one gather: on JAX a read of the bank not
        # ordered before its write makes XLA copy the whole bank every step.
        negative_ids = None
        memory = None
        if self.num_negatives is not None:
            negative_ids = self._draw(seed)
            if not updating:
                memory = _backend.read_rows(self.bank, negative_ids)
        elif updating and self.compute_dtype == "float32":
            # No new tensor from the cast, and PyTorch writes rows in place.
            memory = self._bank_before.read(self.bank)
        else:
            memory = _backend.read_value(self.bank)

        if updating:
            rows_at, negatives = self._update(
                features, ids, seed, training, negative_ids
            )
            if negatives is not None:
                memory = negatives
            if self.num_negatives is None and self.compute_dtype == "float32":
                self._bank_before.record(self.bank, rows_at)
        memory = ops.cast(memory, self.compute_dtype)
        if negative_ids is None:
            return memory
        return memory, negative_ids

    def _draw(self, seed: Tensor) -> Tensor:
        """`num_negatives` ids, uniform with replacement, from `seed` (no advance)."""
        draw = keras.random.uniform((self.num_negatives,), seed=SeedValue(seed))
        ids = ops.cast(ops.floor(draw * self.num_samples), "int32")
        return ops.minimum(ids, self.num_samples - 1)

    def _update(
        self,
        features: Tensor,
        ids: Tensor,
        seed: Tensor,
        training: bool | Tensor,
        negative_ids: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """NPID's rule on the rows of the ids in the (global) batch.

        Returns the rows written and, given `negative_ids`, the bank's rows
        there before the update.
        """
        x = ops.stop_gradient(ops.cast(features, "float32"))
        valid = ops.logical_and(ids >= 0, ids < self.num_samples)
        # Every replica's rows, so that every replica writes the same rows.
        x, present = distributed.cross_replica_gather(x)
        skipped = ops.sum(1 - ops.cast(valid, "int32"))
        if present is not None:
            ids = distributed.cross_replica_gather(ids)[0]
            in_range = distributed.cross_replica_gather(valid)[0]
            valid = ops.logical_and(present, in_range)
            skipped = ops.sum(
                ops.cast(ops.logical_and(present, ops.logical_not(in_range)), "int32")
            )

        # The mean features of each id in the batch, one row per id
        # (`_groups`: a sort of the ids, O(B log B + B * D)).
        groups = group_by_id(ids, valid, self.num_samples)
        negatives = None
        if negative_ids is None:
            old_rows = _backend.read_rows(self.bank, groups.ids)
        else:
            slots = ops.shape(groups.ids)[0]
            rows = _backend.read_rows(
                self.bank, ops.concatenate([groups.ids, negative_ids])
            )
            old_rows, negatives = rows[:slots], rows[slots:]
        count = groups.sums(ops.cast(valid, "float32"))[:, None]
        mean = groups.sums(x) / ops.maximum(count, 1.0)

        m = self.momentum
        moved = m * old_rows + (1.0 - m) * mean
        norm = ops.sqrt(ops.sum(ops.square(moved), axis=-1, keepdims=True))
        new_rows = moved / ops.maximum(norm, 1e-12)

        # Rows without a valid id write what the first row writes (its old
        # row back when no id is valid), so that duplicate indices always
        # carry identical rows.
        new_rows = ops.where(groups.valid[:, None], new_rows, old_rows)
        new_rows = groups.first_valid_where_not(new_rows)
        rows_at = groups.rows_at()
        self.commit_state(
            (self.bank, rows_at, new_rows),
            (self.sampler_seed, seed + ops.convert_to_tensor([0, 1], seed.dtype)),
            (self.out_of_range_ids, next_count(self.out_of_range_ids, skipped)),
            training=training,
        )
        return rows_at, negatives

    def compute_output_spec(
        self, inputs: Any, training: bool | Tensor | None = None
    ) -> Any:
        features, _ = self._split_inputs(inputs)
        self._check_features(features)
        if self.num_negatives is None:
            return keras.KerasTensor(
                (self.num_samples, self.dim), dtype=self.compute_dtype
            )
        return (
            keras.KerasTensor((self.num_negatives, self.dim), dtype=self.compute_dtype),
            keras.KerasTensor((self.num_negatives,), dtype="int32"),
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_samples": self.num_samples,
            "momentum": self.momentum,
            "num_negatives": self.num_negatives,
            "seed": self.seed,
            "bank_initializer": (
                None
                if self.bank_initializer is None
                else keras.initializers.serialize(self.bank_initializer)
            ),
        }

    # ---------------------------------------------------------------- inputs

    def _split_shapes(self, input_shape: Any) -> tuple[Any, Any]:
        if not (isinstance(input_shape, (list, tuple)) and len(input_shape) == 2):
            raise ValueError(self._inputs_help(f"input shape {input_shape}"))
        first = input_shape[0]
        if first is None or isinstance(first, int):
            raise ValueError(self._inputs_help(f"one tensor of shape {input_shape}"))
        return tuple(input_shape[0]), tuple(input_shape[1])

    def _split_inputs(self, inputs: Any) -> tuple[Tensor, Tensor]:
        if not (isinstance(inputs, (list, tuple)) and len(inputs) == 2):
            raise ValueError(self._inputs_help(type(inputs).__name__))
        return inputs[0], inputs[1]

    def _inputs_help(self, received: str) -> str:
        return (
            f"Layer '{self.name}' is called on [features, sample_ids]; received "
            f"{received}. Write `MemoryBank({self.num_samples})([features, "
            "sample_ids])` with each sample's index in the dataset as a second "
            "model input."
        )

    def _features_help(self, shape: tuple[Any, ...]) -> str:
        expected = "(batch, dim)" if self.dim is None else f"(batch, {self.dim})"
        return (
            f"Layer '{self.name}': features must have shape {expected} with a "
            f"known dim; received shape {tuple(shape)}. Flatten them first, "
            "e.g. `keras.layers.Flatten()(features)`."
        )

    def _check_features(self, features: Any) -> None:
        shape = tuple(features.shape)
        if len(shape) != 2 or shape[-1] != self.dim:
            raise ValueError(self._features_help(shape))
        dtype = keras.backend.standardize_dtype(features.dtype)
        if not keras.backend.is_float_dtype(dtype):
            raise TypeError(
                f"Layer '{self.name}': features must be floats; received dtype "
                f'{dtype}. Cast them first: `ops.cast(features, "float32")`.'
            )

    def _sample_ids(self, sample_ids: Any) -> Tensor:
        sample_ids = ops.convert_to_tensor(sample_ids)
        shape = tuple(sample_ids.shape)
        if not (len(shape) == 1 or (len(shape) == 2 and shape[-1] == 1)):
            raise ValueError(
                f"Layer '{self.name}': sample_ids must have shape (B,) or "
                f"(B, 1), one index per sample; received shape {shape}."
            )
        ids = _checks.integer_ids(
            sample_ids,
            self.name,
            "sample_ids",
            'Declare the input as `keras.Input((), dtype="int32")` or cast them '
            'with `ops.cast(sample_ids, "int32")`.',
        )
        _checks.ids_in_range(
            ids,
            self.num_samples,
            self.name,
            "sample_ids must be",
            "Raise num_samples to the size of the dataset or fix the ids.",
        )
        return ids
