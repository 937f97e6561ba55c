"""Samples grouped by id in O(B log B), for the row updates of a batch.

`CenterLoss` (class ids) and `MemoryBank` (sample ids) update one row per id
in the batch from the sum of its samples. A `(B, B)` same-id matrix or a
`(num_ids, D)` segment sum would cost O(B^2) or O(num_ids * D) per step;
here the ids alone are sorted, and each sample is sent to its run of equal
ids. Sums over a run are then segment sums of the samples as they lie, into
at most `min(B, num_ids + 1)` rows: no `(B, D)` copy of the features is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keras import ops

from keras_stateful.types import Tensor


@dataclass
class Groups:
    """Each sample's run of equal ids, and each run's id.

    `sample_run`: `(B,)` int32, the run of each sample (in the batch's own
    order); invalid samples share one run. `slots`: the number of runs
    allowed, `min(B, num_ids + 1)` (a Python int when B is known). `ids`:
    `(slots,)` each run's id, 0 for the invalid run and the unused slots;
    `valid`: `(slots,)` whether the run has a valid id.
    """

    sample_run: Tensor
    slots: Any
    ids: Tensor
    valid: Tensor

    def sums(self, values: Tensor) -> Tensor:
        """`(slots, ...)`: the sum of `values` over each run, 0 where not valid.

        The samples are added in the batch's order.
        """
        total = ops.segment_sum(values, self.sample_run, num_segments=self.slots)
        shape = (-1,) + (1,) * (len(values.shape) - 1)
        return ops.where(ops.reshape(self.valid, shape), total, 0.0)

    def first_valid_where_not(self, values: Tensor) -> Tensor:
        """`values` per run, with the first run's where a run is not valid.

        Row writes at `where(valid, ids, ids[0])` then carry identical rows at
        duplicate indices. Runs are sorted by id with the invalid run last: if
        the first run is not valid, no run is (every sample was invalid).
        """
        shape = (-1,) + (1,) * (len(values.shape) - 1)
        return ops.where(ops.reshape(self.valid, shape), values, values[0:1])

    def rows_at(self) -> Tensor:
        """`(slots,)`: where each run's row is written (see above)."""
        return ops.where(self.valid, self.ids, self.ids[0])


def group_by_id(ids: Tensor, valid: Tensor, num_ids: int) -> Groups:
    """Group the samples by id: sort the ids alone, number the runs.

    `ids` `(B,)` int32, `valid` `(B,)` bool (ids in `[0, num_ids)`); B > 0.
    """
    batch = ops.shape(ids)[0]
    slots = (
        min(batch, num_ids + 1)
        if isinstance(batch, int)
        else ops.minimum(batch, num_ids + 1)
    )
    keys = ops.where(valid, ids, num_ids)  # invalid samples sort last
    order = ops.argsort(keys)
    sorted_keys = ops.take(keys, order)
    run = run_index(sorted_keys)
    # Each run's id (slots past the last run keep `num_ids`: none).
    run_key = ops.scatter_update(
        ops.full((slots,), num_ids, "int32"), run[:, None], sorted_keys
    )
    # `order` is a permutation: a scatter without duplicate indices. (Keras's
    # `ops.scatter` adds, and loops over the indices in Python on PyTorch.)
    sample_run = ops.scatter_update(ops.zeros((batch,), "int32"), order[:, None], run)
    run_valid = run_key < num_ids
    return Groups(
        sample_run=sample_run,
        slots=slots,
        ids=ops.where(run_valid, run_key, 0),
        valid=run_valid,
    )


def run_index(sorted_keys: Tensor) -> Tensor:
    """For sorted keys, the index of each key's run of equal values.

    `[3, 3, 5, 7, 7, 7]` gives `[0, 0, 1, 2, 2, 2]`.
    """
    starts = ops.not_equal(sorted_keys[1:], sorted_keys[:-1])
    return ops.cumsum(
        ops.concatenate([ops.zeros((1,), "int32"), ops.cast(starts, "int32")])
    )
