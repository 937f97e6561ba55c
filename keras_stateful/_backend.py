"""Everything that differs between JAX, TensorFlow and PyTorch, in one place.

Layer files speak `keras.ops` only. This module is the only one in the package
that branches on `keras.backend.backend()` or imports from `keras.src`.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import keras
from keras.src.backend.common import global_state
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.backend.common.variables import AutocastScope

from keras_stateful.types import Tensor

BACKEND: str = keras.backend.backend()

# The dtype `keras.random` expects of a seed tensor on this backend.
SEED_DTYPE: str = {"jax": "uint32", "tensorflow": "int64"}.get(BACKEND, "int32")

# Counters are int32 (on every backend and accelerator) and stop at this
# value instead of wrapping: 2**31 - 1 updates.
COUNTER_LIMIT = 2**31 - 1


def read_value(variable: keras.Variable) -> Tensor:
    """The current value of `variable` as a plain tensor, never the variable.

    On TensorFlow `ops.convert_to_tensor(variable)` hands back the
    `tf.Variable` itself, and assigning an expression built on it to the same
    variable recurses; reading through here gives a tensor on every backend.
    """
    value = variable.value
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(value)
    return value


class ValueBeforeRowWrites:
    """A variable's value as it was before this call's row writes.

    A layer that returns its state as it stood before the update (MemoryQueue
    returns the queue before the batch) needs that value to outlive the
    update. JAX arrays are immutable and a TensorFlow variable read is a
    value, so there `read` is the plain read. PyTorch writes the rows in
    place, so the read would show them: `read` hands out a copy instead.

    Copying the whole variable at every call would cost `O(rows of the
    variable)`. Instead this keeps one copy that lags the variable by the rows
    written at the last call (`record` notes them, `O(written rows)`), and
    `read` brings it up to date by writing just those rows. The copy is
    rebuilt in full (as a fresh tensor) whenever it may be stale or in use:
    the variable was written by anything but the recorded call (its version
    counter or tensor changed: `assign`, `set_weights`, loading), the copy
    was modified, a tensor handed out earlier is still alive (held by the
    caller or saved by autograd for a backward pass that has not run; the
    count of tensors sharing its storage tells), under `torch.compile`, or in
    a stateless scope.
    """

    def __init__(self) -> None:
        self._copy: Any = None
        self._pending: Any = None  # (indices, rows) the copy still lacks
        self._source: Any = None  # (tensor, version) of the variable after them
        self._copy_version = -1
        self._copy_uses = -1

    def read(self, variable: keras.Variable) -> Tensor:
        """The value now; it stays as it is after `variable`'s rows are written."""
        value = read_value(variable)
        if BACKEND != "torch":
            return value
        import torch

        if in_stateless_scope() or torch.compiler.is_compiling():
            self._pending = None
            return value.clone()
        if self._can_catch_up(value):
            with torch.no_grad():
                self._copy.index_copy_(0, *self._pending)
        else:
            self._copy = value.detach().clone()
            self._copy_uses = _storage_uses(self._copy)
        self._pending = None
        self._copy_version = self._copy._version
        # A view, so that while the caller or autograd holds it the storage
        # has another user and the next call rebuilds instead of writing.
        return self._copy.view_as(self._copy)

    def record(self, variable: keras.Variable, indices: Tensor) -> None:
        """Note the rows of `variable` this call wrote (after the write)."""
        if BACKEND != "torch" or self._copy is None:
            return
        import torch

        if in_stateless_scope() or torch.compiler.is_compiling():
            return
        value = read_value(variable)
        indices = indices.to(torch.long)
        with torch.no_grad():
            self._pending = (indices, value.index_select(0, indices))
        self._source = (value, value._version)

    def _can_catch_up(self, value: Any) -> bool:
        if self._pending is None or self._source is None:
            return False
        tensor, version = self._source
        if not (
            value is tensor
            and value._version == version
            and self._copy._version == self._copy_version
        ):
            return False
        if _storage_uses(self._copy) <= self._copy_uses:
            return True
        # Keras's call machinery (its `tree` helpers) leaves the view handed
        # out last in a short-lived reference cycle, so it outlives the step
        # until the cycle collector runs. Collecting the young generations
        # frees it for tens of microseconds (a full collection would take a
        # third of a second); whatever still holds the view is real use.
        gc.collect(1)
        return _storage_uses(self._copy) <= self._copy_uses


def _storage_uses(tensor: Any) -> int:
    """How many tensors share `tensor`'s storage (a large number if unknown)."""
    import torch

    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return 2**62
    return int(count(tensor.untyped_storage()._cdata))


def read_rows(variable: keras.Variable, indices: Tensor) -> Tensor:
    """`variable[indices]`, reading only those rows where the backend allows.

    On TensorFlow a gather from the `tf.Variable` itself reads the rows; a
    read of the whole value first would copy every row at every step.
    """
    if BACKEND == "tensorflow" and not in_stateless_scope():
        import tensorflow as tf

        with AutocastScope(None):
            return tf.gather(variable.value, indices, axis=0)
    return keras.ops.take(read_value(variable), indices, axis=0)


def assign(variable: keras.Variable, value: Tensor) -> None:
    """`variable.assign(value)`, with any autocast scope switched off.

    Under mixed precision on PyTorch, an autocast variable's `assign` writes
    into a float16 copy and the update is lost without an error; assigning
    with autocasting off always writes the stored variable.
    """
    with AutocastScope(None):
        variable.assign(value)


def assign_rows(variable: keras.Variable, indices: Tensor, rows: Tensor) -> None:
    """`variable[indices] = rows`, writing only those rows where possible.

    Duplicate indices must carry identical rows (their order is undefined).
    In a stateless scope (JAX's `fit`, `stateless_call`) the new value is
    built functionally; XLA updates a donated buffer in place. Eagerly and in
    a `tf.function`, TensorFlow and PyTorch write the rows in place, so the
    cost does not grow with the number of rows of the variable.
    """
    with AutocastScope(None):
        if BACKEND == "tensorflow" and not in_stateless_scope():
            import tensorflow as tf

            if _tf_replica_context() is not None:
                # A mirrored variable has no scatter_nd_update in a replica
                # step; every replica writes the same rows.
                variable.value.scatter_update(
                    tf.IndexedSlices(rows, tf.cast(indices, "int64"))
                )
                return
            variable.value.scatter_nd_update(
                tf.expand_dims(tf.cast(indices, "int64"), 1), rows
            )
            return
        if BACKEND == "torch" and not in_stateless_scope():
            import torch

            with torch.no_grad():
                variable.value.index_copy_(0, indices.to(torch.long), rows)
            return
        variable.assign(
            keras.ops.scatter_update(read_value(variable), indices[:, None], rows)
        )


def _tf_replica_context() -> Any:
    """The replica context of a multi-replica `tf.distribute` step, or None."""
    import tensorflow as tf

    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync < 2:
        return None
    return context


def _torch_world() -> bool:
    """Whether a multi-process `torch.distributed` group is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def accumulator(name: str, scope: str) -> keras.Variable:
    """A float32 scalar for a logged sum: outside the weights, summed on read.

    Created like a Keras metric's variable (`aggregation="sum"`,
    `synchronization="on_read"`): under `tf.distribute` each replica adds to
    its own copy and a read in the cross-replica context returns their sum.
    Elsewhere these settings change nothing. Its path is `scope/name`.
    """
    with keras.name_scope(scope):
        return keras.Variable(
            keras.initializers.Zeros(),
            shape=(),
            dtype="float32",
            trainable=False,
            autocast=False,
            aggregation="sum",
            synchronization="on_read",
            name=name,
        )


def sum_over_processes(values: Any) -> Any:
    """A NumPy array summed over the processes of a `torch.distributed` group.

    Every process must call it. Elsewhere (one process, JAX, TensorFlow) it
    returns `values` unchanged.
    """
    if BACKEND != "torch" or not _torch_world():
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.as_tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.numpy()


def cross_replica_sum(x: Tensor) -> Tensor:
    """Sum `x` over all replicas of a data-parallel run.

    Layers pass the sufficient statistics of their update (sums, counts)
    through this before they compute the new state, so every replica
    computes the same, global, new state. On one device it returns `x`.

    - JAX with `keras.distribution`: the batch is one globally sharded
      array, so a reduction over it is already global: `x` is returned.
    - TensorFlow inside a `tf.distribute` replica step: an all-reduce.
    - PyTorch with an initialised multi-process `torch.distributed` group
      (DDP): an all-reduce, differentiable-free (the statistics carry no
      gradient).
    """
    if BACKEND == "tensorflow":
        context = _tf_replica_context()
        if context is not None:
            import tensorflow as tf

            return context.all_reduce(tf.distribute.ReduceOp.SUM, x)
    if BACKEND == "torch" and _torch_world():
        import torch.distributed as dist

        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def cross_replica_gather(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """All replicas' `x`, concatenated along axis 0 in replica order.

    Returns `(gathered, valid)`. Replicas may hold batches of different
    sizes: each is padded to the largest, and `valid` (a bool vector over
    the gathered rows) marks the real ones. On one device, and on JAX with
    `keras.distribution` (the batch is already global), it returns
    `(x, None)`: nothing was gathered.
    """
    ops = keras.ops
    if BACKEND == "tensorflow":
        context = _tf_replica_context()
        if context is None:
            return x, None
        count = ops.shape(x)[0]
        largest = ops.max(context.all_gather(ops.reshape(count, (1,)), axis=0))
        # All-gather takes no bool tensors: send bools as int32.
        is_bool = keras.backend.standardize_dtype(x.dtype) == "bool"
        rows = _pad_rows(ops.cast(x, "int32") if is_bool else x, largest - count)
        valid = _pad_rows(ops.ones((count,), "int32"), largest - count)
        gathered = context.all_gather(rows, axis=0)
        return (
            gathered > 0 if is_bool else gathered,
            context.all_gather(valid, axis=0) > 0,
        )
    if BACKEND == "torch" and _torch_world():
        import torch
        import torch.distributed as dist

        count = torch.tensor([x.shape[0]], device=x.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        padding = int(count.item()) - x.shape[0]
        valid = _pad_rows(
            torch.ones(x.shape[0], dtype=torch.bool, device=x.device), padding
        )
        x = _pad_rows(x.detach(), padding).contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        flags = [torch.empty_like(valid) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        dist.all_gather(flags, valid)
        return torch.cat(parts, dim=0), torch.cat(flags, dim=0)
    return x, None


def _pad_rows(x: Tensor, rows: Any) -> Tensor:
    """`x` with `rows` zero (false) rows appended along axis 0."""
    widths = [[0, rows]] + [[0, 0]] * (len(x.shape) - 1)
    return keras.ops.pad(x, widths)


def cross_replica_max(x: Tensor) -> Tensor:
    """Elementwise maximum of `x` over all replicas (identity on one device)."""
    context = _tf_replica_context() if BACKEND == "tensorflow" else None
    if context is not None:
        return keras.ops.max(context.all_gather(x[None], axis=0), axis=0)
    if BACKEND == "torch" and _torch_world():
        import torch.distributed as dist

        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def cross_replica_min(x: Tensor) -> Tensor:
    """Elementwise minimum of `x` over all replicas (identity on one device)."""
    return -cross_replica_max(-x)


def current_training_flag() -> Any:
    """The `training` value of the Keras layer call now running, or None."""
    call_context = global_state.get_global_attribute("current_call_ctx")
    if call_context is None:
        return None
    return call_context.get_value("training")


def is_concrete(x: Tensor) -> bool:
    """Whether `x` holds values that can be read now (not traced or symbolic)."""
    if BACKEND == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return bool(tf.executing_eagerly())
    if BACKEND == "torch":
        import torch

        return not torch.compiler.is_compiling() and x.device.type != "meta"
    return False


def can_assign(value: Tensor) -> bool:
    """False for a JAX tracer outside a stateless scope (a user's `jax.jit`)."""
    if BACKEND != "jax" or in_stateless_scope():
        return True
    import jax

    return not isinstance(value, jax.core.Tracer)


def check_assignable(value: Tensor, layer_name: str) -> None:
    """Refuse to store a JAX tracer in a variable outside a stateless scope.

    `layer(x, training=True)` inside a user's own `jax.jit` would otherwise
    leave a tracer in the variable and fail later, far from the cause.
    """
    if not can_assign(value):
        raise RuntimeError(
            f"Layer '{layer_name}' was called with training=True inside a "
            "jax transformation (jax.jit, jax.grad, ...) outside a Keras "
            "stateless scope, so its state update would leave a tracer in a "
            "variable. Inside your own jitted function call\n"
            "    outputs, non_trainable_values = layer.stateless_call(\n"
            "        trainable_values, non_trainable_values, x, training=True)\n"
            "and return the new non-trainable values instead (or use "
            "`model.fit`, which does this for you)."
        )


@contextlib.contextmanager
def protect_state_reads(layer: keras.layers.Layer) -> Iterator[None]:
    """Let a layer read its state in differentiable ops and then update it.

    PyTorch saves some inputs of an op for its backward pass and refuses to
    run backward once such a tensor was modified in place ("one of the
    variables needed for gradient computation has been modified by an inplace
    operation"). While this context is open, any non-trainable variable of
    `layer` that autograd saves is saved as a copy, so the in-place update
    that follows is safe and the gradient uses the value the forward pass
    saw, as on JAX and TensorFlow. The copy is made only for tensors autograd
    actually saves. Elsewhere this does nothing.
    """
    if BACKEND != "torch":
        yield
        return
    import torch

    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        # No graph is recorded, or the compiler functionalises the update.
        yield
        return
    storages = {
        variable.value.untyped_storage().data_ptr()
        for variable in layer.non_trainable_variables
        if variable._value is not None
    }
    if not storages:
        yield
        return

    def pack(tensor: Any) -> Any:
        # Detach what is packed: autograd re-attaches the history on unpack
        # from its own record. Packing an op's output as itself would make the
        # output hold its own grad_fn, a cycle through C++ that the garbage
        # collector cannot free (pytorch/pytorch#115255): memory grows on every
        # call whose graph is never backpropagated.
        if tensor.untyped_storage().data_ptr() in storages:
            return tensor.detach().clone()
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield
