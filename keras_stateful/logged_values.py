"""Values that layers report for the logs: where they are kept, when they are
recorded, and the `LogLayerValues` callback that shows them.

A layer declares a value with `StatefulLayer.add_logged_value(name)` and
reports it from `call()` with `log_value(name, value, count)`. Its running
mean lives in two float32 accumulators (a weighted sum and a count) that are
variables of the layer but not weights, as a Keras metric's are:

- they are in `layer.variables` and `non_trainable_variables`, so every
  backend carries them through `fit` and `evaluate` (JAX included, where a
  layer-owned `keras.metrics.Metric` is dropped: keras-team/keras#21639);
- they are not in `layer.weights`, `get_weights()` or a saved `.keras` file;
- they are recorded only in a training call and during evaluation (Keras's
  `test_step` once `LogLayerValues` is attached, or inside
  `evaluation_logging()`); `predict`, a call with `training=False` or `None`,
  a loaded model and an exported serving function never write them;
- under `tf.distribute` they are summed over replicas when read (like a
  metric's), under `torch.distributed` `LogLayerValues` sums them over
  processes during `fit`, and on JAX the batch is already global.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_stateful import _backend, distributed
from keras_stateful.types import Tensor

_MARK = "_keras_stateful_records_logged_values"


class _EvaluationDepth:
    """How many evaluation scopes are open, over all threads.

    A counter, not a context variable: `tf.distribute` traces each replica's
    step in a thread of its own, and those threads must see the scope that
    the step was entered with.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._all_replicas = 0  # of them, opened with all_replicas=True

    @property
    def active(self) -> bool:
        return self._depth > 0

    @property
    def all_replicas(self) -> bool:
        return self._all_replicas > 0

    def enter(self, all_replicas: bool) -> None:
        with self._lock:
            self._depth += 1
            self._all_replicas += int(all_replicas)

    def exit(self, all_replicas: bool) -> None:
        with self._lock:
            self._depth -= 1
            self._all_replicas -= int(all_replicas)


_EVALUATING = _EvaluationDepth()
_FIT_RUNNING = _EvaluationDepth()  # `fit` calls under LogLayerValues


@contextlib.contextmanager
def evaluation_logging(*, all_replicas: bool = False) -> Iterator[None]:
    """Record logged values in the inference calls made inside this context.

    Outside training, layers record their logged values only while this
    context is open. `LogLayerValues` opens it around Keras's `test_step`
    (so `evaluate` and `fit`'s validation record, `predict` does not); open
    it yourself around the calls of a custom evaluation loop. It changes no
    weight or state: only the logging accumulators.

    Args:
        all_replicas: Whether every process of a `torch.distributed` group
            makes the same calls in this context, so that a layer may
            combine their batches for a value that is not a mean of
            per-sample values (VectorQuantizerEMA's perplexity and usage,
            from the global code counts). Leave it `False` when one process
            may evaluate alone. Under `tf.distribute` (whose replicas always
            step together) and on JAX (whose batch is global) it makes no
            difference. Defaults to `False`.

    Example:

    ```python
    layer = keras_stateful.layers.CenterLoss(num_classes=3, name="center_loss")
    x, y = np.ones((4, 2), "float32"), np.array([0, 1, 2, 0])
    with keras_stateful.evaluation_logging():
        layer([x, y], training=False)
    layer.logged_values()  # {'center_loss': 1.0}
    ```
    """
    _EVALUATING.enter(all_replicas)
    try:
        yield
    finally:
        _EVALUATING.exit(all_replicas)


def evaluating_on_all_replicas() -> bool:
    """Whether an evaluation is being recorded with every replica taking part.

    True under `tf.distribute` and on JAX whenever `evaluation_logging()` is
    open; under `torch.distributed` only when it was opened with
    `all_replicas=True`. A layer may then reduce over replicas in inference.
    """
    if not _EVALUATING.active:
        return False
    return _backend.BACKEND != "torch" or _EVALUATING.all_replicas


def recording_gate(training: Any) -> Any:
    """Whether a call records its logged values: True, a bool tensor, or None.

    None (record nothing) in inference outside `evaluation_logging()`; True
    in evaluation or a training call with a Python `True`; the flag itself
    when `training` is a tensor (decided when the graph runs).
    """
    if _EVALUATING.active:
        return True
    if training is None:
        return None
    if ops.is_tensor(training):
        return ops.cast(training, "bool")
    return True if training else None


class LoggedMean:
    """A running mean, weighted by sample counts, kept outside the weights."""

    def __init__(self, name: str, scope: str) -> None:
        self.total = _backend.accumulator(f"{name}_total", scope)
        self.count = _backend.accumulator(f"{name}_count", scope)

    @property
    def variables(self) -> list[keras.Variable]:
        return [self.total, self.count]

    def add(self, value: Tensor, count: Tensor, gate: Any) -> None:
        """`total += value * count; count += count` where `gate` holds."""
        weighted = value * count
        if gate is not True:
            weighted = ops.where(gate, weighted, 0.0)
            count = ops.where(gate, count, 0.0)
        _backend.assign(self.total, _backend.read_value(self.total) + weighted)
        _backend.assign(self.count, _backend.read_value(self.count) + count)

    def sums(self) -> tuple[float, float]:
        """`(total, count)` as Python floats (summed over replicas on TF)."""
        return (
            float(ops.convert_to_numpy(self.total)),
            float(ops.convert_to_numpy(self.count)),
        )

    def reset(self) -> None:
        self.total.assign(0.0)
        self.count.assign(0.0)


class LoggedValues:
    """The logged means of one layer, by name."""

    def __init__(self, layer_name: str) -> None:
        self._layer_name = layer_name
        self._means: dict[str, LoggedMean] = {}
        # Where 0.1.0 stored each mean's (total, count) among the layer's
        # non-trainable weights, to load files saved by it (see `legacy`).
        self.legacy_positions: list[int] = []

    def declare(self, name: str, weights_so_far: int) -> None:
        if name in self._means:
            raise ValueError(
                f"Layer '{self._layer_name}': logged value '{name}' exists."
            )
        position = weights_so_far + 2 * len(self._means)
        self.legacy_positions.extend([position, position + 1])
        self._means[name] = LoggedMean(name, self._layer_name)

    @property
    def variables(self) -> list[keras.Variable]:
        return [v for mean in self._means.values() for v in mean.variables]

    def record(self, name: str, value: Tensor, count: Any, training: Any) -> None:
        if name not in self._means:
            raise ValueError(
                f"Layer '{self._layer_name}': no logged value '{name}'; declare "
                f"it with `self.add_logged_value({name!r})` in __init__()."
            )
        gate = recording_gate(training)
        if gate is None:
            return
        value = ops.stop_gradient(ops.cast(value, "float32"))
        if not _backend.can_assign(value):
            return  # a user's own jax.jit, outside a stateless scope
        count = ops.stop_gradient(ops.cast(count, "float32"))
        self._means[name].add(value, count, gate)

    def sums(self) -> dict[str, tuple[float, float]]:
        return {name: mean.sums() for name, mean in self._means.items()}

    def reset(self) -> None:
        for mean in self._means.values():
            mean.reset()


def means(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    """`total / count` by name; NaN where nothing was recorded."""
    return {
        name: float(total) / float(count) if count else float("nan")
        for name, (total, count) in sums.items()
    }


def without_legacy_entries(store: Any, legacy: list[int], expected: int) -> Any:
    """A weights store of a 0.1.0 file without its logged-value entries.

    keras_stateful 0.1.0 kept logged values in weights; a file it saved has
    them among the layer's entries. Returns `store` itself otherwise.
    """
    if not legacy or len(store.keys()) != expected + len(legacy):
        return store
    skipped = set(legacy)
    kept = [i for i in range(len(store.keys())) if i not in skipped]
    return {str(new): store[str(old)] for new, old in enumerate(kept)}


def record_in_evaluation(model: keras.Model) -> None:
    """Make `model`'s evaluation (its `test_step`) record logged values.

    Wraps the model's `test_step` in `evaluation_logging()` and drops a test
    function compiled before, so that `evaluate` and `fit`'s validation
    record, while `predict` (its own step) never does.
    """
    step = model.test_step
    if getattr(step, _MARK, False):
        return

    def test_step(*args: Any, **kwargs: Any) -> Any:
        # In fit every process validates; a plain evaluate may run alone.
        with evaluation_logging(all_replicas=_FIT_RUNNING.active):
            return step(*args, **kwargs)

    setattr(test_step, _MARK, True)
    model.test_step = test_step
    model.test_function = None


def _stateful_layers(model: keras.layers.Layer) -> list[Any]:
    from keras_stateful.stateful_layer import find_stateful_layers

    return find_stateful_layers(model)


def read_sums(model: keras.layers.Layer, *, across_processes: bool) -> dict:
    """Every stateful layer's `(total, count)` by name.

    With `across_processes`, summed over the processes of a running
    `torch.distributed` group (a collective: every process must call it).
    """
    sums: dict[str, tuple[float, float]] = {}
    for layer in _stateful_layers(model):
        sums.update(layer._logged_values.sums())
    if not across_processes or not sums:
        return sums
    flat = np.array([part for pair in sums.values() for part in pair], "float64")
    flat = distributed.sum_over_processes(flat)
    return {name: (flat[2 * i], flat[2 * i + 1]) for i, name in enumerate(sums)}


def read_logged_values(model: keras.layers.Layer) -> dict[str, float]:
    """The logged means of every stateful layer of `model`, global over replicas.

    Under `torch.distributed` every process must call it (it sums over
    processes); under `tf.distribute` the replicas' sums are added when
    read, and on JAX the batch is global already.

    Example:

    ```python
    inputs = keras.Input((2,))
    labels = keras.Input((), dtype="int32")
    outputs = keras_stateful.layers.CenterLoss(3, name="center_loss")(
        [inputs, labels]
    )
    model = keras.Model([inputs, labels], outputs)
    model([np.ones((4, 2), "float32"), np.array([0, 1, 2, 0])], training=True)
    keras_stateful.read_logged_values(model)  # {'center_loss': 1.0}
    ```
    """
    return means(read_sums(model, across_processes=True))


def reset_logged_values(model: keras.layers.Layer) -> None:
    """Start every stateful layer's logged means of `model` again from nothing."""
    for layer in _stateful_layers(model):
        layer._logged_values.reset()


class LogLayerValues(keras.callbacks.Callback):
    """Adds the values that stateful layers report to the `fit` logs.

    Layers report values with `StatefulLayer.log_value()`: `CenterLoss` its
    weighted loss under its name (`center_loss`), for instance. This callback
    averages them over each epoch (weighted by batch size, as Keras averages
    `loss`) and puts them in the logs that the progress bar, `History` and
    later callbacks see: `center_loss` for training and `val_center_loss` for
    validation. In a plain `evaluate(..., callbacks=[callback])` the progress
    bar shows them and `callback.evaluation_values` holds them (Keras hands
    callbacks a copy of the logs, so they are not in the returned dict).

    Training calls record the values by themselves. For evaluation, the
    callback makes the model's `test_step` record them (it wraps it in
    `keras_stateful.evaluation_logging()` when attached, and drops a test
    function compiled before); `predict` records nothing. The values live in
    accumulators beside the weights, never in them: `evaluate` and `predict`
    change no weight. Under `tf.distribute` and `torch.distributed` the
    values in `fit`'s logs are the global means over all replicas (under
    `torch.distributed` every process must run `fit` with the callback: it
    sums over processes). A plain `evaluate` under `torch.distributed`
    reports each process's own values, as Keras's metrics do there. A key
    that Keras already writes is never overwritten.

    Args:
        every_batch: Whether to add the running values after every batch, as
            the progress bar shows `loss`, and not only at the end of each
            epoch and evaluation. On JAX each read attaches the model state
            to the model (a host sync), so set it to `False` for the fastest
            runs. Defaults to `True`.

    Example:

    ```python
    history = model.fit(
        x, y, epochs=3, validation_split=0.2,
        callbacks=[keras_stateful.LogLayerValues()],
    )
    history.history["center_loss"], history.history["val_center_loss"]
    ```
    """

    def __init__(self, every_batch: bool = True) -> None:
        super().__init__()
        self.every_batch = bool(every_batch)
        self._in_fit = False
        self._training_values: dict[str, float] | None = None
        self.evaluation_values: dict[str, float] = {}

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        record_in_evaluation(model)

    def _read(self) -> dict[str, float]:
        return means(read_sums(self.model, across_processes=self._in_fit))

    @staticmethod
    def _add(logs: dict[str, Any] | None, values: dict[str, float]) -> None:
        if logs is not None:
            for key, value in values.items():
                logs.setdefault(key, value)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._in_fit = True
        _FIT_RUNNING.enter(True)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._in_fit = False
        _FIT_RUNNING.exit(True)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._training_values = None
        self.evaluation_values = {}
        reset_logged_values(self.model)

    def on_train_batch_end(
        self, batch: int, logs: dict[str, Any] | None = None
    ) -> None:
        if self.every_batch:
            self._add(logs, self._read())

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._in_fit:
            # Validation reuses the layers' sums: keep the epoch's first.
            self._training_values = self._read()
        reset_logged_values(self.model)

    def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.every_batch:
            self._add(logs, self._read())

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        self.evaluation_values = self._read()
        self._add(logs, self.evaluation_values)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._training_values is None:
            self._add(logs, self._read())
            return
        self._add(logs, self._training_values)
        self._add(logs, {f"val_{k}": v for k, v in self.evaluation_values.items()})
