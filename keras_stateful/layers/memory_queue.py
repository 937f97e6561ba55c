"""`MemoryQueue`: the MoCo ring buffer of keys, with its pointer on the device."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_stateful import _backend, _torch_buffers, distributed
from keras_stateful.layers import _checks
from keras_stateful.stateful_layer import StatefulLayer
from keras_stateful.types import Tensor


@keras.saving.register_keras_serializable(package="keras_stateful")
class MemoryQueue(StatefulLayer):
    """A queue of the last `size` keys (MoCo); returns it as it was before the batch.

    Called on a batch of keys `(B, D)`, it returns the `(size, D)` queue as it
    stood before this batch, for use as negatives (cast to the layer's
    compute dtype), and in training enqueues the keys at the pointer,
    wrapping around, as MoCo's `_dequeue_and_enqueue` does. With `p` the
    pointer and `i = 0, ..., B - 1`:

    - `queue[(p + i) % size] = keys[i]` (cut from the gradient, stored in
      float32, L2-normalised first if `normalize=True`)
    - `pointer = (p + B) % size`
    - `filled = min(filled + B, size)`

    Only the `B` written rows are computed and stored, and the pointer never
    leaves the device (no `int(queue_ptr)`), so the enqueue costs the same
    for a queue of 1,000 or 65,536 keys and runs inside a jitted `fit`. Any
    batch size works: one that does not divide `size` wraps around, and of
    a batch larger than `size` only its last `size` keys are kept (key `k`
    of the keys enqueued since the layer was built or reset is in slot
    `k % size`). A batch with a non-finite key is not enqueued at all (see
    `guard_non_finite`). In inference nothing changes.

    **Slots not yet filled.** The queue starts as `queue_initializer` says
    (zeros by default) with `filled = 0`; the slots
    `[0, filled)` hold enqueued keys. `return_mask=True` makes the layer
    return `(queue, mask)`, where `mask[j]` (a `(size,)` bool tensor) says
    whether slot `j` of the returned queue holds a key: mask the logits of
    the other slots. `layer.valid_mask()` gives the mask of the queue as it
    is now, outside a call. MoCo instead starts from random unit vectors and
    uses every slot from the first step: pass a seeded random initializer
    (e.g. `RandomNormal(stddev=D ** -0.5, seed=0)`, whose rows have norms
    close to 1) and ignore the mask.

    The queue a training call returns must outlive the write of the new
    rows. On JAX and TensorFlow a read is a value, so that is free until the
    returned queue is read (then XLA or TensorFlow may copy it when they
    update the state in place). PyTorch writes the state in place, so there
    the layer keeps a second `size x D` float32 buffer that it brings up to
    date by the `B` rows written at the previous step, and returns that: the
    enqueue stays `O(B)`. While a queue returned earlier is still alive (you
    keep it, or autograd keeps it for a backward pass that has not run yet),
    or when the state was written from outside (`assign`, `set_weights`,
    `reset_state()`, loading), the buffer is rebuilt by one full copy
    instead, so every returned queue stays exactly the queue before its
    batch. Under mixed precision the cast to the compute dtype is a new
    tensor anyway.

    **`trainable=False`** stops the updates (recompile after changing it);
    `freeze_state()` stops them while training goes on.

    Args:
        size: Number of keys `K` the queue holds.
        normalize: Whether to L2-normalise each key (`k / max(||k||, 1e-12)`)
            before it is stored. Defaults to `False` (MoCo normalises the
            keys in the encoder).
        return_mask: Whether to return `(queue, mask)` instead of the queue.
            Defaults to `False`.
        queue_initializer: Initializer of the `(size, D)` queue, also used
            by `reset_state()`. Defaults to `"zeros"`.
        **kwargs: `StatefulLayer` arguments (`guard_non_finite`, `name`, ...).

    Call arguments:
        keys: Keys of shape `(B, D)`, e.g. the momentum encoder's output.
        training: Whether the call is in training mode (enqueues the keys).

    Example:

    ```python
    # q: queries (B, D); k: keys from the momentum encoder (B, D), both normalised.
    q = ops.normalize(keras.random.normal((32, 128)))
    k = ops.normalize(keras.random.normal((32, 128)))
    negatives, valid = keras_stateful.layers.MemoryQueue(65536, return_mask=True)(k)
    l_pos = ops.sum(q * k, axis=-1, keepdims=True)
    l_neg = ops.where(valid, ops.matmul(q, ops.transpose(negatives)), -1e4)
    logits = ops.concatenate([l_pos, l_neg], axis=1) / 0.07  # label 0 is positive
    ```

    Reference:
        - [He et al., 2020](https://arxiv.org/abs/1911.05722) (MoCo), and its
          [code](https://github.com/facebookresearch/moco/blob/main/moco/builder.py)
    """

    def __init__(
        self,
        size: int,
        *,
        normalize: bool = False,
        return_mask: bool = False,
        queue_initializer: Any = "zeros",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.size = _checks.integer(
            size,
            "size",
            layer="MemoryQueue",
            example="MemoryQueue(65536)",
            minimum=1,
            meaning="the number of keys kept",
        )
        self.normalize = bool(normalize)
        self.return_mask = bool(return_mask)
        self.queue_initializer = keras.initializers.get(queue_initializer)
        self.dim: int | None = None
        self.queue = None
        self.pointer = None
        self.filled = None
        self._queue_before = _torch_buffers.ValueBeforeRowWrites()

    def build(self, input_shape: Any) -> None:
        shape = tuple(input_shape)
        if len(shape) != 2 or shape[-1] is None:
            raise ValueError(self._shape_help(shape))
        self.dim = int(shape[-1])
        self.queue = self.add_state(
            "queue", (self.size, self.dim), initializer=self.queue_initializer
        )
        self.pointer = self.add_state("pointer", (), dtype="int32")
        self.filled = self.add_state("filled", (), dtype="int32")

    def call(self, keys: Tensor, training: bool | Tensor | None = None) -> Any:
        self._check_keys(keys)

        # What the call returns: the queue and its mask before this batch.
        # In float32 the cast makes no new tensor, and PyTorch will write the
        # rows in place: keep the value as it is now.
        updating = self.may_update(training)
        keep_before = self.compute_dtype == "float32" and updating
        if keep_before:
            queue = self._queue_before.read(self.queue)
        else:
            queue = ops.cast(_backend.read_value(self.queue), self.compute_dtype)
        filled = _backend.read_value(self.filled)
        mask = (
            ops.arange(self.size, dtype="int32") < filled if self.return_mask else None
        )
        if updating:
            slots = self._enqueue(keys, filled, training)
            if keep_before:
                self._queue_before.record(self.queue, slots)
        if self.return_mask:
            return queue, mask
        return queue

    def _enqueue(self, keys: Tensor, filled: Tensor, training: bool | Tensor) -> Tensor:
        """Write the keys (all replicas') at the pointer; return the slots."""
        shape = tuple(keys.shape)
        pointer = _backend.read_value(self.pointer)

        # The B written rows. Key i goes to slot (pointer + i) % size; when B
        # exceeds size, several keys share a slot and each of them writes the
        # last one, key i + size * ((B - 1 - i) // size), so that duplicate
        # indices carry identical rows.
        x = ops.cast(keys, "float32")
        if self.normalize:
            norm = ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True))
            x = x / ops.maximum(norm, 1e-12)
        # In a data-parallel run every replica enqueues all replicas' keys,
        # in replica order (MoCo's concat_all_gather); padding rows of
        # uneven batches sort last and are not written.
        x, present = distributed.cross_replica_gather(x)
        # A non-finite key anywhere in the batch stops the whole enqueue,
        # also one that a later key of a batch larger than `size` overwrites.
        finite = ops.all(ops.isfinite(x)) if self.guard_non_finite else None
        if present is None:
            static = shape[0] if isinstance(shape[0], int) else None
            batch = static if static is not None else ops.shape(keys)[0]
            offsets = ops.arange(batch, dtype="int32")
        else:
            static = None
            offsets = ops.arange(ops.shape(x)[0], dtype="int32")
            real_first = ops.where(present, offsets, offsets + ops.shape(x)[0])
            x = ops.take(x, ops.argsort(real_first), axis=0)
            batch = ops.sum(ops.cast(present, "int32"))
            # Rows past the real keys repeat the last real key's write.
            offsets = ops.minimum(offsets, ops.maximum(batch - 1, 0))
        slots = ops.mod(pointer + offsets, self.size)
        if static is None or static > self.size:
            last = offsets + self.size * ops.floor_divide(
                batch - 1 - offsets, self.size
            )
            x = ops.take(x, ops.maximum(last, 0), axis=0)
        if finite is not None:
            x = ops.where(finite, x, float("nan"))
        if present is not None:
            # No real key at all: write back what the slots hold.
            old_rows = _backend.read_rows(self.queue, slots)
            x = ops.where(batch > 0, x, old_rows)
        self.commit_state(
            (self.queue, slots, x),
            (self.pointer, ops.mod(pointer + batch, self.size)),
            (self.filled, ops.minimum(filled + batch, self.size)),
            training=training,
        )
        return slots

    def compute_output_spec(
        self, keys: Any, training: bool | Tensor | None = None
    ) -> Any:
        self._check_keys(keys)
        queue = keras.KerasTensor((self.size, self.dim), dtype=self.compute_dtype)
        if self.return_mask:
            return queue, keras.KerasTensor((self.size,), dtype="bool")
        return queue

    def valid_mask(self) -> Tensor:
        """A `(size,)` bool tensor: which slots of the queue hold a key now.

        It reads the state as it is (after the last training call); the mask
        that goes with the queue a call returns is what `return_mask=True`
        gives.
        """
        if self.filled is None:
            raise ValueError(
                f"Layer '{self.name}' is not built yet, so it has no queue. "
                "Call it on a batch of keys first, e.g. `layer(keys)`."
            )
        return ops.arange(self.size, dtype="int32") < _backend.read_value(self.filled)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "size": self.size,
            "normalize": self.normalize,
            "return_mask": self.return_mask,
            "queue_initializer": keras.initializers.serialize(self.queue_initializer),
        }

    def _check_keys(self, keys: Any) -> None:
        shape = tuple(keys.shape)
        if len(shape) != 2 or shape[-1] != self.dim:
            raise ValueError(self._shape_help(shape))
        dtype = keras.backend.standardize_dtype(keys.dtype)
        if not keras.backend.is_float_dtype(dtype):
            raise TypeError(
                f"Layer '{self.name}': keys must be floats; received dtype "
                f'{dtype}. Cast them first: `ops.cast(keys, "float32")`.'
            )

    def _shape_help(self, shape: tuple[Any, ...]) -> str:
        expected = "(batch, dim)"
        if self.dim is not None:
            expected = f"(batch, {self.dim})"
        return (
            f"Layer '{self.name}': keys must have shape {expected} with a "
            f"known dim; received shape {shape}. Flatten them first, e.g. "
            "`keras.layers.Flatten()(keys)`, and give the model input a full "
            "shape, e.g. `keras.Input(shape=(128,))`."
        )
