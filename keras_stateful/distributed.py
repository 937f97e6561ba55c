"""Cross-replica collectives for data-parallel layers, on every backend.

A layer whose update needs the global batch passes its sufficient statistics
(sums, counts, extremes, rows) through these before computing the new state,
so that every replica computes the same, global, new state:

- JAX with `keras.distribution`: the batch is one globally sharded array, so
  a reduction over it is already global: each function returns its input.
- TensorFlow inside a `tf.distribute` replica step: an all-reduce or
  all-gather over the replicas.
- PyTorch with an initialised multi-process `torch.distributed` group (DDP):
  `torch.distributed` collectives (statistics carry no gradient).
- One device: the input, unchanged.

Call them only when the layer can update (`StatefulLayer.may_update`), so that
inference never communicates and one replica may predict alone.

Example:

```python
from keras_stateful.distributed import cross_replica_sum

class GlobalBatchMean(keras_stateful.StatefulLayer):
    def build(self, input_shape):
        self.mean = self.add_state("mean", (input_shape[-1],))

    def call(self, inputs, training=None):
        if self.may_update(training):
            x = ops.cast(inputs, "float32")
            total = cross_replica_sum(ops.sum(x, axis=0))
            count = cross_replica_sum(ops.cast(ops.shape(x)[0], "float32"))
            self.commit_state((self.mean, total / count), training=training)
        return inputs

layer = GlobalBatchMean()
layer(np.ones((4, 3), "float32"), training=True)  # one device: mean = 1
```
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_stateful.types import Tensor

BACKEND: str = keras.backend.backend()

__all__ = [
    "cross_replica_gather",
    "cross_replica_max",
    "cross_replica_mean",
    "cross_replica_min",
    "cross_replica_sum",
]


def tf_replica_context() -> Any:
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


def communicates() -> bool:
    """Whether the collectives below communicate now; if not, each returns `x`.

    A layer may then take a one-device shortcut with the same result (e.g.
    `ops.mean` for a sum divided by a count).
    """
    if BACKEND == "tensorflow":
        return tf_replica_context() is not None
    return BACKEND == "torch" and _torch_world()


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


def cross_replica_sum(x: Tensor, *, differentiable: bool = False) -> Tensor:
    """Sum `x` over all replicas of a data-parallel run.

    Layers pass the sufficient statistics of their update (sums, counts)
    through this before they compute the new state, so every replica
    computes the same, global, new state. On one device it returns `x`.

    - JAX with `keras.distribution`: the batch is one globally sharded
      array, so a reduction over it is already global: `x` is returned.
    - TensorFlow inside a `tf.distribute` replica step: an all-reduce
      (differentiable: its gradient is the all-reduced gradient).
    - PyTorch with an initialised multi-process `torch.distributed` group
      (DDP): an all-reduce. By default the result carries no gradient (the
      statistics of a state update need none); with `differentiable=True`
      its backward pass all-reduces the incoming gradient, so that each
      replica gets the gradient of the global loss (the sum of the
      replicas' losses) with respect to its own `x`, as
      `torch.nn.SyncBatchNorm` does. Every replica must then run backward.

    Args:
        x: The tensor to sum, of the same shape on every replica.
        differentiable: Whether gradients flow through the sum on PyTorch
            (on JAX and TensorFlow they always do). Defaults to `False`.
    """
    if BACKEND == "tensorflow":
        context = tf_replica_context()
        if context is not None:
            import tensorflow as tf

            return context.all_reduce(tf.distribute.ReduceOp.SUM, x)
    if BACKEND == "torch" and _torch_world():
        if differentiable:
            return _torch_all_reduce_sum().apply(x)
        import torch.distributed as dist

        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


_ALL_REDUCE_SUM: Any = None


def _torch_all_reduce_sum() -> Any:
    """A `torch.autograd.Function`: all-reduce forward and backward (made once)."""
    global _ALL_REDUCE_SUM
    if _ALL_REDUCE_SUM is None:
        import torch
        import torch.distributed as dist

        class AllReduceSum(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, tensor: Any) -> Any:
                total = tensor.detach().clone().contiguous()
                dist.all_reduce(total, op=dist.ReduceOp.SUM)
                return total

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:
                total = grad.detach().clone().contiguous()
                dist.all_reduce(total, op=dist.ReduceOp.SUM)
                return total

        _ALL_REDUCE_SUM = AllReduceSum
    return _ALL_REDUCE_SUM


def cross_replica_mean(x: Tensor) -> Tensor:
    """Mean of `x` over all replicas (identity on one device).

    Each replica's `x` counts once, whatever its batch size: for the mean of
    the global batch, reduce sums and counts with `cross_replica_sum` and
    divide (a mean of per-replica means is wrong when batches differ).
    """
    replicas = cross_replica_sum(ops.ones((), "float32"))
    return cross_replica_sum(x) / ops.cast(replicas, x.dtype)


def cross_replica_gather(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """All replicas' `x`, concatenated along axis 0 in replica order.

    Returns `(gathered, valid)`. Replicas may hold batches of different
    sizes: each is padded to the largest, and `valid` (a bool vector over
    the gathered rows) marks the real ones. On one device, and on JAX with
    `keras.distribution` (the batch is already global), it returns
    `(x, None)`: nothing was gathered.
    """
    if BACKEND == "tensorflow":
        context = tf_replica_context()
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
    return ops.pad(x, widths)


def cross_replica_max(x: Tensor) -> Tensor:
    """Elementwise maximum of `x` over all replicas (identity on one device)."""
    context = tf_replica_context() if BACKEND == "tensorflow" else None
    if context is not None:
        return ops.max(context.all_gather(x[None], axis=0), axis=0)
    if BACKEND == "torch" and _torch_world():
        import torch.distributed as dist

        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def cross_replica_min(x: Tensor) -> Tensor:
    """Elementwise minimum of `x` over all replicas (identity on one device)."""
    return -cross_replica_max(-x)
