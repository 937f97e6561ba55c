"""Gradient accumulation for stateful layers: one state update per optimizer step.

With `optimizer=keras.optimizers.Adam(gradient_accumulation_steps=N)` Keras
applies the weights once every `N` micro-batches. A `StatefulLayer` with
`accumulation_steps=N` does the same with its state: it adds the sufficient
statistics of each micro-batch (sums and counts, extremes, merged moments)
to accumulators, and at the last micro-batch of each window computes its
update once, from the statistics of the whole effective batch.

- The window is counted by the layer's own `window_step` (int32 state), from
  0 like the optimizer's `iterations`: windows line up with the optimizer's
  when both start together (a fresh model, or a resumed one).
- The accumulators and `window_step` are state (`add_state`): listed in
  `state_variables`, saved, restored by `BackupAndRestore`, reset by
  `reset_state()` (which empties an open window). Inference never touches
  them.
- A micro-batch whose statistics are not finite is left out of its window
  and counted in `skipped_updates`; the window still counts it, so it stays
  in step with the optimizer. The update at the window's end uses the other
  micro-batches.
- `freeze_state()` (or `trainable=False`) pauses an open window: nothing of
  the layer changes, its accumulators and `window_step` included, until the
  state is unfrozen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from keras_stateful import _backend
from keras_stateful.types import Tensor

Statistics = dict[str, Tensor]
Merge = Callable[[Statistics, Statistics], Statistics]

#: How each kind of statistic merges, and the value of an empty window.
KINDS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], float]] = {
    "sum": (lambda a, b: a + b, 0.0),
    "min": (ops.minimum, math.inf),
    "max": (ops.maximum, -math.inf),
}


class Window:
    """One layer's accumulators, and what a training call does to them."""

    def __init__(self) -> None:
        self.specs: dict[str, tuple[tuple[int, ...], str]] = {}
        self.accumulators: dict[str, keras.Variable] = {}
        self.step: keras.Variable | None = None
        self.pending: PendingWindow | None = None

    def declare(self, name: str, shape: tuple[int, ...], kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(
                f"add_statistic(): kind must be one of {sorted(KINDS)}; "
                f"received kind={kind!r}. Write e.g. "
                f'`self.add_statistic("{name}", shape, kind="sum")`.'
            )
        self.specs[name] = (tuple(shape), kind)

    def create(self, layer: Any) -> None:
        """The window counter and the accumulators, as the layer's state."""
        if self.step is None:
            self.step = layer.add_state("window_step", (), dtype="int32")
        for name, (shape, kind) in self.specs.items():
            if name not in self.accumulators:
                initial = keras.initializers.Constant(KINDS[kind][1])
                self.accumulators[name] = layer.add_state(
                    f"accumulated_{name}", shape, initializer=initial
                )

    def merge(
        self, statistics: Statistics, steps: int, merge: Merge | None
    ) -> Statistics:
        """The window's statistics with this micro-batch's added in.

        Also notes, for the commit that follows, the accumulators' next
        values and whether this micro-batch closes the window.
        """
        missing = sorted(set(self.specs) - set(statistics))
        extra = sorted(set(statistics) - set(self.specs))
        if missing or extra:
            raise ValueError(
                f"accumulate(): statistics {sorted(statistics)} do not match "
                f"those declared with add_statistic() {sorted(self.specs)}."
            )
        window = {k: _backend.read_value(v) for k, v in self.accumulators.items()}
        batch = {k: ops.cast(v, "float32") for k, v in statistics.items()}
        merged = merge(window, batch) if merge else self._merge_by_kind(window, batch)
        finite = _all_finite(list(batch.values()))
        totals = {k: ops.where(finite, merged[k], window[k]) for k in window}
        assert self.step is not None
        step = _backend.read_value(self.step) + 1
        closes = step >= steps
        self.pending = PendingWindow(closes, finite, totals, step)
        return totals

    def _merge_by_kind(self, window: Statistics, batch: Statistics) -> Statistics:
        return {k: KINDS[self.specs[k][1]][0](window[k], batch[k]) for k in window}

    def next_values(self, pending: PendingWindow) -> list[tuple[keras.Variable, Any]]:
        """The accumulators and counter after this micro-batch."""
        updates: list[tuple[keras.Variable, Any]] = []
        for name, variable in self.accumulators.items():
            empty = ops.full(variable.shape, KINDS[self.specs[name][1]][1], "float32")
            updates.append(
                (variable, ops.where(pending.closes, empty, pending.totals[name]))
            )
        assert self.step is not None
        updates.append((self.step, ops.where(pending.closes, 0, pending.step)))
        return updates


class PendingWindow:
    """What `accumulate` found, for the `commit_state` of the same call."""

    def __init__(self, closes: Tensor, finite: Tensor, totals: Statistics, step: Any):
        self.closes = closes
        self.finite = finite
        self.totals = totals
        self.step = step


def _all_finite(values: list[Tensor]) -> Tensor:
    finite = ops.convert_to_tensor(True)
    for value in values:
        finite = ops.logical_and(finite, ops.all(ops.isfinite(value)))
    return finite


def set_accumulation_steps(model: keras.layers.Layer, n: int | None = None) -> int:
    """Set `accumulation_steps` on every stateful layer of `model`.

    Call it after `compile` and before `fit`. With `n=None` it takes the
    compiled optimizer's `gradient_accumulation_steps` (1 when it has none),
    so the state updates once per optimizer step, from the whole effective
    batch.

    Args:
        model: A model (or layer) holding `StatefulLayer`s, nested ones too.
        n: Micro-batches per window. Defaults to `None`: the optimizer's.

    Returns:
        The number of micro-batches per window that was set.

    Example:

    ```python
    inputs = keras.Input((3,))
    model = keras.Model(
        inputs, keras.layers.Dense(1)(keras_stateful.layers.MovingMoments()(inputs))
    )
    model.compile(keras.optimizers.SGD(0.1, gradient_accumulation_steps=4), "mse")
    keras_stateful.set_accumulation_steps(model)  # 4, from the optimizer
    ```
    """
    from keras_stateful.stateful_layer import find_stateful_layers

    if n is None:
        optimizer = getattr(model, "optimizer", None)
        n = getattr(optimizer, "gradient_accumulation_steps", None) or 1
    for layer in find_stateful_layers(model):
        layer.set_accumulation_steps(n)
    return int(n)
