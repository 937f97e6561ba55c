"""Variable reads and writes, tracer checks and autograd hooks, per backend.

Layer files speak `keras.ops` only. What differs between JAX, TensorFlow and
PyTorch lives here and in two neighbours: `keras_stateful.distributed` (the
public cross-replica collectives) and `_torch_buffers` (PyTorch's lagging copy
for MemoryQueue). Only these three modules branch on `keras.backend.backend()`,
and only this one imports from `keras.src`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import keras
from keras.src.backend.common import global_state
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.backend.common.variables import AutocastScope, get_autocast_scope

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
    if BACKEND == "torch":
        return _read_torch(variable)
    value = variable.value
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(value)
    return value


def _read_torch(variable: keras.Variable) -> Tensor:
    """`variable.value` on PyTorch; the stored tensor itself when that is what it is.

    Outside a stateless scope, an autocast scope (for a variable that
    autocasts) and a device scope (Keras reads a variable as a `meta` stub in
    a symbolic call), `variable.value` is the stored tensor: read it without
    the property's device-name checks, a few microseconds a read on the
    update path.
    """
    stored = variable._value
    if (
        stored is None
        or in_stateless_scope()
        or global_state.get_global_attribute("torch_device") is not None
        or (variable._autocast and get_autocast_scope() is not None)
    ):
        return variable.value
    return stored


def read_stored_value(variable: keras.Variable) -> Tensor:
    """`variable`'s value in its own dtype, never autocast.

    Under mixed precision a layer call opens an autocast scope (even for a
    layer with `autocast=False` when no scope is open yet), and a float32
    variable read there comes back float16. `AveragedModel` averages the
    student's weights as stored, and `SpectralNormalization` runs its power
    iteration on the float32 kernel, through here.
    """
    with AutocastScope(None):
        return read_value(variable)


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

            from keras_stateful.distributed import tf_replica_context

            if tf_replica_context() is not None:
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


def writes_in_place() -> bool:
    """Whether a commit may write the variables' storage directly now.

    True on eager PyTorch outside a stateless scope and outside the
    compiler: `commit_state` then takes the fused path below (a few torch
    ops for the whole commit instead of a Keras op per step). Elsewhere the
    update is built from `keras.ops` (once, at trace time, on JAX and
    TensorFlow).
    """
    if BACKEND != "torch" or in_stateless_scope():
        return False
    import torch

    return not torch.compiler.is_compiling()


def as_tensor_for(variable: keras.Variable, value: Any) -> Tensor:
    """`ops.convert_to_tensor(value)`; a torch tensor on the variable's device as is."""
    if BACKEND == "torch":
        import torch

        stored = variable._value
        if (
            isinstance(value, torch.Tensor)
            and stored is not None
            and value.device == stored.device
        ):
            return value
    return keras.ops.convert_to_tensor(value)


def stored_form(variable: keras.Variable, value: Tensor) -> Tensor:
    """`value` cut from the gradient, in the dtype `variable` stores (torch)."""
    stored = variable._value
    if value.requires_grad:
        value = value.detach()
    if value.dtype != stored.dtype:
        value = value.to(stored.dtype)
    return value


def on_host(values: list[Tensor]) -> bool:
    """Whether every value is a CPU tensor (torch), so a flag read costs no sync."""
    return all(value.is_cpu for value in values)


def all_finite_in_place(values: list[Tensor]) -> Tensor | None:
    """A 0-d bool tensor: every float value finite; None if none is float.

    Small values (the per-feature statistics of a commit) are checked with
    one `isfinite(...).all()` over their concatenation; large ones one by
    one, so that no copy of a large state is made.
    """
    import torch

    floats = [value for value in values if value.is_floating_point()]
    if not floats:
        return None
    if len(floats) == 1:
        return torch.isfinite(floats[0]).all()
    if sum(value.numel() for value in floats) <= _CONCATENATE_UP_TO:
        return torch.isfinite(torch.cat([v.reshape(-1) for v in floats])).all()
    checks = [torch.isfinite(value).all() for value in floats]
    return torch.stack(checks).all()


# Values checked together (one concatenation) up to this many elements.
_CONCATENATE_UP_TO = 1 << 16


def all_finite_on_host(values: list[Tensor]) -> bool | None:
    """Whether every float value is finite, read on the host; None if none is float.

    Exact: a value whose sum is finite has only finite elements (a NaN or an
    infinity makes the sum non-finite), so one sum per value, read into
    Python, settles the common case; a non-finite sum (a non-finite value,
    or finite ones that overflow it) is settled element by element. A sum
    is one kernel where `isfinite` is several element-wise ops.
    """
    floats = [value for value in values if value.is_floating_point()]
    if not floats:
        return None
    if all(math.isfinite(value.sum()) for value in floats):
        return True
    return bool(all_finite_in_place(floats))


def write_where_in_place(updates: Any, gate: Tensor) -> None:
    """`variable = where(gate, value, variable)` in the variables' storage.

    `updates` are `(variable, indices or None, value)` with `value` in the
    variable's stored dtype (`stored_form`). A whole variable takes one
    `torch.where` written into it; rows take a select, a where and an
    `index_copy_`, at a cost that does not grow with the variable's rows.
    A gate of Python `True` (decided on the host) copies the values in.
    """
    import torch

    if gate is True:
        _copy_in_place(updates)
        return
    with torch.no_grad():
        for variable, indices, value in updates:
            stored = variable._value
            if indices is None:
                if _shares_memory(value, stored):
                    value = value.clone()  # `out=` refuses a partial overlap
                torch.where(gate, value, stored, out=stored)
            else:
                indices = indices.to(torch.long)
                old = stored.index_select(0, indices)
                stored.index_copy_(0, indices, torch.where(gate, value, old))


def _copy_in_place(updates: Any) -> None:
    """Each `(variable, indices or None, value)` copied into the variable.

    The stored tensors are not trainable and the values carry no gradient
    (`stored_form`), so no autograd mode needs switching.
    """
    import torch

    for variable, indices, value in updates:
        stored = variable._value
        if indices is not None:
            stored.index_copy_(0, indices.to(torch.long), value)
            continue
        if _shares_memory(value, stored):
            value = value.clone()  # a partial overlap would be refused
        stored.copy_(value)


def count_in_place(counter: keras.Variable, condition: Tensor) -> None:
    """`counter += 1` where `condition` holds, stopping at `COUNTER_LIMIT`."""
    import torch

    with torch.no_grad():
        stored = counter._value
        stored.add_(condition & (stored != COUNTER_LIMIT))


def next_count_in_place(current: Tensor) -> Tensor:
    """`current + 1` for an int32 counter, stopping at `COUNTER_LIMIT` (torch).

    On the CPU the count is read and the new one made on the host: two
    cheap calls instead of two tensor ops.
    """
    import torch

    if current.is_cpu:
        count = min(int(current) + 1, COUNTER_LIMIT)
        return torch.scalar_tensor(count, dtype=current.dtype)
    return current + (current != COUNTER_LIMIT)


def ema_fused(old: Tensor, new: Tensor, take: float) -> Tensor | None:
    """`(1 - take) * old + take * new` in one op on eager PyTorch, else None.

    `torch.lerp(old, new, take)` is the same average, rounded differently
    (`old + take * (new - old)`): the values agree to about a float32 ulp.
    One kernel instead of three, each with a wrapped Python number.
    """
    if BACKEND != "torch" or in_stateless_scope():
        return None
    import torch

    if torch.compiler.is_compiling() or old.dtype != new.dtype:
        return None
    return torch.lerp(old, new, take)


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


# ------------------------------------------------------------ hot-path ops
#
# A few `keras.ops` functions the per-step statistics call often, with the
# same results. On PyTorch, which runs eagerly, a Keras op costs several
# times the torch op it wraps (dispatch, dtype and device checks, tree
# walks); these call torch directly. Elsewhere they are the Keras ops (on
# JAX and TensorFlow they run once, when the step is traced).


def sum_keepdims(x: Tensor, axes: tuple[int, ...]) -> Tensor:
    """`ops.sum(x, axis=axes, keepdims=True)` for a float `x` and axes `!= ()`."""
    if BACKEND == "torch":
        return x.sum(dim=axes, keepdim=True)
    return keras.ops.sum(x, axis=axes, keepdims=True)


def shifted_moments_fused(
    x: Tensor, reduce_axes: tuple[int, ...]
) -> tuple[int, Tensor, Tensor, Tensor] | None:
    """`(n, shift, mean - shift, variance)` of `x` per feature, or None.

    Eager PyTorch only (elsewhere, and for a layout it does not take, None):
    the moments come from the kernel `torch.nn.BatchNorm*` updates its
    running statistics with, one call instead of three sums and their
    element-wise passes. That kernel accumulates the mean in float32, which
    a large common offset (values near 1e6) would round, so it runs on
    `x - shift` with `shift` the first value of each feature: the centred
    values are small and their sums exact enough. `n` is the number of
    values per feature (a Python int) and `variance` the biased one. `x` is
    float32 with at least one value. The tensors carry no gradient and hold
    one value per feature, the reduced axes dropped or kept (size 1):
    reshape them to the per-feature shape.
    """
    if BACKEND != "torch" or not x.numel():
        return None
    import torch

    layout = _fused_moments_layout(len(x.shape), reduce_axes)
    if layout is None or torch.compiler.is_compiling():
        return None
    first_values, flatten = layout
    if x.requires_grad:
        x = x.detach()
    shift = x[first_values]
    centred = x - shift
    if flatten:
        centred = centred.reshape(-1, shift.numel())
    offset, variance = torch.batch_norm_update_stats(centred, None, None, 0.0)
    return x.numel() // variance.numel(), shift, offset, variance


@functools.lru_cache(maxsize=64)
def _fused_moments_layout(
    rank: int, reduce_axes: tuple[int, ...]
) -> tuple[tuple[int | slice, ...], bool] | None:
    """How `shifted_moments_fused` takes an input of this rank, or None.

    The kernel reduces every axis but axis 1. Features on axis 1 go as they
    are; features on the trailing axes are flattened to one axis first.
    Returns the index of the first value of each feature (broadcastable
    against the input) and whether to flatten.
    """
    import torch

    kept = [axis for axis in range(rank) if axis not in reduce_axes]
    trailing = kept == list(range(rank - len(kept), rank))
    if not kept or not (kept == [1] or trailing):
        return None
    if not hasattr(torch, "batch_norm_update_stats"):
        return None
    # Leading reduced axes are indexed away; later ones kept with size 1.
    first_values = tuple(
        (0 if axis < kept[0] else slice(0, 1)) if axis in reduce_axes else slice(None)
        for axis in range(rank)
    )
    return first_values, kept != [1]


def as_float32(x: Tensor) -> Tensor:
    """`ops.cast(x, "float32")`; a float32 torch tensor as it is."""
    if BACKEND == "torch":
        import torch

        if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
            return x
    return keras.ops.cast(x, "float32")


def centred_moments(x: Tensor, axes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """`mean` and `mean((x - stop_gradient(mean))**2)` over `axes`, kept (size 1).

    With gradients: the variance's gradient through the mean is zero
    (`-2 E[x - mean] = 0`), so the mean enters it cut from the gradient.
    """
    if BACKEND == "torch":
        mean = x.mean(dim=axes, keepdim=True)
        return mean, (x - mean.detach()).square().mean(dim=axes, keepdim=True)
    ops = keras.ops
    mean = ops.mean(x, axis=axes, keepdims=True)
    centred = x - ops.stop_gradient(mean)
    return mean, ops.mean(ops.square(centred), axis=axes, keepdims=True)


def maximum(x: Tensor, y: Tensor | float) -> Tensor:
    """`ops.maximum(x, y)` for a float tensor `x` (NaN propagates)."""
    if BACKEND == "torch":
        import torch

        if isinstance(y, float):
            return torch.clamp_min(x, y)
        return torch.maximum(x, y)
    return keras.ops.maximum(x, y)


def where(condition: Tensor, x: Tensor, y: Tensor | float) -> Tensor:
    """`ops.where(condition, x, y)` for a float tensor `x`."""
    if BACKEND == "torch":
        import torch

        return torch.where(condition, x, y)
    return keras.ops.where(condition, x, y)


def square(x: Tensor) -> Tensor:
    """`ops.square(x)` for a float tensor `x`."""
    if BACKEND == "torch":
        return x.square()
    return keras.ops.square(x)


def full_like(x: Tensor, value: float) -> Tensor:
    """`ops.full_like(x, value)`: a tensor of `x`'s shape and dtype."""
    if BACKEND == "torch":
        import torch

        return torch.full_like(x, value)
    return keras.ops.full_like(x, value)


def reshape(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """`ops.reshape(x, shape)` for a tensor `x`."""
    if BACKEND == "torch":
        return x if x.shape == shape else x.reshape(shape)
    return keras.ops.reshape(x, shape)


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


@contextlib.contextmanager
def new_state_allowed(layer: keras.layers.Layer) -> Iterator[None]:
    """Let a built layer create variables (Keras locks a layer's state at build)."""
    tracker = layer._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if locked:
            tracker.lock()


def flatten_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """`model` and every layer nested in it (Keras's private traversal)."""
    return [model, *model._flatten_layers(include_self=False)]


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


# ------------------------------------------------------------ weight averages
#
# `AveragedModel` updates a float32 copy of a model's weights at every step:
# with millions of weights each pass over them counts. The new values are
# `old * (1 - weight) + student * weight` (two products, each rounded, then
# their sum) with `0 <= weight <= 1`, and
# the commit needs to know exactly whether all of them are finite. Per
# backend, with as few passes over the weights as it allows:
#
# - eager PyTorch on CPU: the check from the inputs (`averages_finite`), and
#   the values computed in place at the commit's write, only when it writes
#   (`weighted_average_in_place_if`): no temporary copy of the weights, whose
#   allocation (page faults) costs more than the arithmetic;
# - eager PyTorch elsewhere: fused `torch._foreach_*` values, and one
#   `aminmax` pass over each for the check (no `isfinite` mask);
# - JAX: the check from the inputs, so that XLA fuses the average into the
#   write and never stores it apart;
# - TensorFlow: the check from the inputs with TensorFlow's own kernels,
#   one XLA computation that writes the averages into the variables at the
#   commit's write, gated (`weighted_average_in_place_if`), and the
#   commit's other values in one `tf.cond` (`assign_all_if`); in a
#   `tf.distribute` replica step (whose assigns synchronise) or a stateless
#   scope, the values from Keras ops with one `reduce_sum` per value for the
#   check (no `is_finite` mask), written by `commit_state`;
# - compiled PyTorch: the values, checked by `commit_state`.
#
# A check from the inputs is exact: with every old and student value finite
# and at most `_AVERAGE_BOUND` in magnitude, every new value is finite (it
# cannot overflow); otherwise (a value not finite or beyond the bound, which
# training never reaches) the new values themselves are checked, in a branch
# that runs only then.

_AVERAGE_BOUND = 2.0**125  # float32's largest value is about 2**128


def weighted_averages(
    olds: list[Tensor], students: list[Tensor], weight: Tensor, *, check: bool
) -> tuple[list[Tensor], Tensor | None]:
    """The new values, and (when `check`) exactly whether all are finite.

    `olds` and `students` are float32 tensors of the same shapes, `weight` a
    float32 scalar in `[0, 1]`. `finite` is None where `commit_state` should
    check the values (compiled PyTorch), or when `check` is False.
    """
    if BACKEND == "torch" and writes_in_place():
        return _weighted_averages_torch(olds, students, weight, check)
    values = [
        _average(old, student, weight)
        for old, student in zip(olds, students, strict=True)
    ]
    if not check or not values or BACKEND == "torch":
        return values, None
    if BACKEND == "tensorflow":
        return values, _all_finite_by_sum_tf(values)
    return values, _averages_finite_jax(olds, students, weight)


def _average(old: Tensor, student: Tensor, weight: Tensor) -> Tensor:
    """The new value, out of place (`keras.ops` or the backend's operators)."""
    return old * (1.0 - weight) + student * weight


def averages_at_write(olds: list[Tensor]) -> bool:
    """Whether the averages are computed in place at the commit's write.

    Eager PyTorch with every average on the CPU, where the commit's decision
    can be read without a device synchronisation; and TensorFlow outside a
    `tf.distribute` replica step, where one XLA computation averages into
    the variables (`weighted_average_in_place_if`).
    """
    if BACKEND == "tensorflow":
        return bool(olds) and assigns_under_condition()
    if BACKEND != "torch" or not olds or not writes_in_place():
        return False
    return all(old.device.type == "cpu" for old in olds)


def averages_finite(
    olds: list[Tensor], students: list[Tensor], weight: Tensor
) -> Tensor:
    """Whether every new value will be finite, from the inputs.

    On PyTorch (CPU) one `aminmax` pass over each old and student value, on
    TensorFlow one `l2_loss` (half the sum of squares) each; the new values
    are computed and checked only when an input is not finite or beyond the
    bound.
    """
    if BACKEND == "tensorflow":
        return _averages_finite_tf(olds, students, weight)
    import torch

    with torch.no_grad():
        extremes = [
            torch.stack(torch.aminmax(x)) for x in [*olds, *students] if x.numel()
        ]
        if not extremes:
            return torch.tensor(True)
        both = torch.cat(extremes)
        if bool(torch.isfinite(both).all()) and float(both.abs().max()) <= (
            _AVERAGE_BOUND
        ):
            return torch.tensor(True)
        finite = _weighted_averages_torch(olds, students, weight, True)[1]
    return torch.tensor(True) if finite is None else finite


# Elements per slice of the in-place average: its temporary stays in cache.
_SLICE = 1 << 18


def weighted_average_in_place_if(
    condition: Tensor, updates: list[tuple[keras.Variable, Tensor]], weight: Tensor
) -> None:
    """`average = average * (1 - weight) + student * weight` where `condition` holds.

    For `(average, student)` pairs (`averages_at_write`). Eager PyTorch on
    CPU: in the average's storage, a slice at a time, with one small
    temporary for `student * weight` (the same numbers as the out-of-place
    formula). TensorFlow: one XLA computation, a fused loop per variable
    that writes its buffer.
    """
    if BACKEND == "tensorflow":
        variables = [variable.value for variable, _ in updates]
        students = [student for _, student in updates]
        _compiled_tf("average", _average_into_tf)(
            condition, variables, students, weight
        )
        return
    import torch

    if not bool(condition):
        return
    with torch.no_grad():
        keep = 1.0 - weight
        largest = max(student.numel() for _, student in updates)
        scratch = torch.empty(min(_SLICE, largest), dtype=torch.float32)
        for variable, student in updates:
            stored = variable._value
            if not stored.is_contiguous() or student.shape != stored.shape:
                stored.mul_(keep).add_(student * weight)
                continue
            old, new = stored.view(-1), student.reshape(-1)
            for start in range(0, old.numel(), _SLICE):
                part = old[start : start + _SLICE]
                product = scratch[: part.numel()]
                torch.mul(new[start : start + _SLICE], weight, out=product)
                part.mul_(keep).add_(product)


def _weighted_averages_torch(
    olds: list[Tensor], students: list[Tensor], weight: Tensor, check: bool
) -> tuple[list[Tensor], Tensor | None]:
    import torch

    if not olds:
        return [], None
    with torch.no_grad():
        values = torch._foreach_mul(olds, 1.0 - weight)
        torch._foreach_add_(values, torch._foreach_mul(students, weight))
        if not check:
            return list(values), None
        # min and max in one pass; NaN propagates to both, and a value is
        # not finite exactly when its tensor's min or max is not.
        extremes = [torch.stack(torch.aminmax(v)) for v in values if v.numel()]
        if not extremes:
            return list(values), None
        return list(values), torch.isfinite(torch.cat(extremes)).all()


def _averages_finite_jax(
    olds: list[Tensor], students: list[Tensor], weight: Tensor
) -> Tensor:
    import jax
    import jax.numpy as jnp

    inputs = [x for x in [*olds, *students] if x.size]
    if not inputs:
        return jnp.array(True)
    # A finite sum of squares (non-negative terms: no partial sum is below
    # any term) bounds every |x| by 2**64; NaN and infinities make it NaN or
    # infinite. XLA's reduction of `x * x` is faster here than one of
    # `abs(x)` by `max`.
    squares = jnp.sum(jnp.stack([jnp.sum(x * x) for x in inputs]))
    # Module-level branches: eagerly, JAX reuses their traces from call to
    # call (new closures would be traced, and cached, at every call).
    return jax.lax.cond(
        jnp.isfinite(squares),
        _finite_anyway,
        _averages_finite_exactly,
        olds,
        students,
        weight,
    )


def _finite_anyway(*_: Any) -> Tensor:
    import jax.numpy as jnp

    return jnp.array(True)


def _averages_finite_exactly(
    olds: list[Tensor], students: list[Tensor], weight: Tensor
) -> Tensor:
    """Whether every new value is finite, computed again from the inputs.

    The branch of the JAX and TensorFlow checks that runs when an input is
    not finite or beyond the bound. It takes no computed value, which XLA
    would then have to store apart from the write that computes it too.
    """
    checks = [
        keras.ops.all(keras.ops.isfinite(_average(old, student, weight)))
        for old, student in zip(olds, students, strict=True)
    ]
    return keras.ops.all(keras.ops.stack(checks))


_COMPILED_TF: dict[str, Any] = {}


def _compiled_tf(name: str, function: Any) -> Any:
    """`function` as a `tf.function` compiled by XLA, made once per process."""
    if name not in _COMPILED_TF:
        import tensorflow as tf

        _COMPILED_TF[name] = tf.function(function, jit_compile=True)
    return _COMPILED_TF[name]


def _averages_finite_tf(
    olds: list[Tensor], students: list[Tensor], weight: Tensor
) -> Tensor:
    import tensorflow as tf

    inputs = [x for x in [*olds, *students] if x.shape.num_elements()]
    if not inputs:
        return tf.constant(True)
    # As on JAX (`_averages_finite_jax`): a finite sum of squares bounds
    # every input; otherwise the new values are computed and checked.
    # TensorFlow's own `l2_loss` kernel reads each value once, vectorised;
    # XLA's CPU reduction of the same sum, one element after another, takes
    # about four times as long on the 5M weights of the AveragedModel
    # benchmark (benchmarks/profiles/averaged_model_check_tf.py).
    squares = tf.add_n([tf.nn.l2_loss(x) for x in inputs])
    return tf.cond(
        tf.math.is_finite(squares),
        lambda: tf.constant(True),
        lambda: _averages_finite_exactly(olds, students, weight),
    )


def _average_into_tf(
    condition: Tensor, variables: list[Any], students: list[Tensor], weight: Tensor
) -> None:
    import tensorflow as tf

    for variable, student in zip(variables, students, strict=True):
        old = variable.read_value()
        variable.assign(tf.where(condition, _average(old, student, weight), old))


def _all_finite_by_sum_tf(values: list[Tensor]) -> Tensor:
    import tensorflow as tf

    # A NaN or an infinity makes the sum NaN or infinite; a sum that
    # overflows although every value is finite goes to the exact check.
    total = tf.add_n([tf.reduce_sum(value) for value in values])

    def check_values() -> Tensor:
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in values])

    return tf.cond(tf.math.is_finite(total), lambda: tf.constant(True), check_values)


def assigns_under_condition() -> bool:
    """Whether `assign_all_if` applies: TensorFlow, outside a stateless scope
    and a `tf.distribute` replica context (whose assigns synchronise, which a
    `tf.cond` branch may not)."""
    if BACKEND != "tensorflow" or in_stateless_scope():
        return False
    from keras_stateful.distributed import tf_replica_context

    return tf_replica_context() is None


def assign_all_if(
    condition: Tensor, updates: list[tuple[keras.Variable, Tensor]]
) -> None:
    """`variable.assign(value)` for every pair, all when `condition` holds (TF).

    One `tf.cond` for the whole commit: the values are not read again by a
    `where` per variable, and an assign may take over the value's buffer.
    """
    import tensorflow as tf

    def write() -> Any:
        for variable, value in updates:
            assign(variable, value)
        return tf.constant(True)

    tf.cond(condition, write, lambda: tf.constant(False))
