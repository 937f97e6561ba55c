"""PyTorch's copy of a variable that lags it by the rows written last call.

Private: MemoryQueue's way to return the queue before its batch in `O(B)`.
It uses `torch._C._storage_Use_Count` and `gc.collect(1)`; see the class.
"""

from __future__ import annotations

import gc
from typing import Any

import keras

from keras_stateful._backend import BACKEND, in_stateless_scope, read_value
from keras_stateful.types import Tensor


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
