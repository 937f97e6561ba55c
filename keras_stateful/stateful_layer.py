"""`StatefulLayer`: the base class for layers whose state is updated in training."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_stateful import _backend, accumulation, logged_values
from keras_stateful.types import Tensor

_FROM_CALL: Any = object()  # `log_value`'s default: the running call's flag

_TRAINING_HELP = (
    "Pass `training=training` from your layer's `call(self, inputs, "
    "training=None)` signature."
)


@keras.saving.register_keras_serializable(package="keras_stateful")
class StatefulLayer(keras.layers.Layer):
    """Base class for layers with state updated during training, not by gradients.

    Subclasses create their state in `build()` with `add_state()` and, inside
    `call()`, compute the new values and hand them to `commit_state()`:

    - `state = new_value` happens only when the layer is updating: `training`
      is true, `layer.trainable` is true and `layer.freeze_state()` has not
      been called. Otherwise the state keeps its value.
    - The new value is cut from the gradient (`stop_gradient`) and cast to
      the state's dtype (float32 unless asked otherwise, also under mixed
      precision).
    - `training` may be a Python bool or a boolean tensor (a `tf.bool`
      placeholder, a traced JAX bool, a torch tensor): the choice between old
      and new value is then made with `ops.where`, outside any conditional.
    - When a new value is NaN or infinite, none of the values of that commit
      is stored and `layer.skipped_updates` grows by one (unless
      `guard_non_finite=False`).
    - A layer may read its state in differentiable computation and commit a
      new value in the same call; gradients use the value that was read, on
      every backend (also PyTorch, whose in-place update would otherwise break
      `backward()`).

    **On `trainable=False` and `freeze_state()`:** setting
    `layer.trainable = False` stops both gradient and state updates, like
    Keras's `BatchNormalization`; as with any change of `trainable`, compile
    the model again. `layer.freeze_state()` stops only the state updates
    while the layer keeps training; it is stored in a variable, so it takes
    effect in an already compiled `fit` (from a callback too) and is saved
    with the model.

    **Gradient accumulation:** with `accumulation_steps=N` a layer that
    declares its sufficient statistics (`add_statistic` in `build`, then
    `accumulate` in `call`) adds them up over `N` micro-batches and updates
    its state once per window, from the whole effective batch, as an
    optimizer with `gradient_accumulation_steps=N` updates the weights
    (`keras_stateful.set_accumulation_steps(model)` sets it from the
    optimizer). A layer that declares none keeps updating on every
    micro-batch.

    Args:
        guard_non_finite: Whether to skip (and count) updates whose new value
            is not finite. Defaults to `True`.
        accumulation_steps: Micro-batches per state update, for layers that
            declare statistics. Defaults to `1` (every training call).
        **kwargs: Standard `keras.layers.Layer` arguments (`name`, `dtype`,
            `trainable`, ...).

    Example:

    ```python
    class BatchMean(keras_stateful.StatefulLayer):
        def build(self, input_shape):
            self.mean = self.add_state("mean", (input_shape[-1],))

        def call(self, inputs, training=None):
            batch_mean = ops.mean(ops.cast(inputs, "float32"), axis=0)
            new_mean = 0.9 * self.mean + 0.1 * batch_mean
            self.commit_state((self.mean, new_mean), training=training)
            return inputs


    layer = BatchMean()
    layer(np.ones((4, 3)), training=True)
    layer.mean  # [0.1, 0.1, 0.1]
    ```
    """

    def __init__(
        self,
        *,
        guard_non_finite: bool = True,
        accumulation_steps: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.guard_non_finite = bool(guard_non_finite)
        self.accumulation_steps = _check_accumulation_steps(accumulation_steps, self)
        self._window = accumulation.Window()
        self._state_variables: list[keras.Variable] = []
        self._state_initializers: dict[int, Any] = {}
        self._state_updates_enabled = self.add_weight(
            name="state_updates_enabled",
            shape=(),
            dtype="bool",
            initializer="ones",
            trainable=False,
            autocast=False,
        )
        self._skipped_updates = self.add_weight(
            name="skipped_updates",
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            autocast=False,
        )
        self._logged_values = logged_values.LoggedValues(self.name)

    # ------------------------------------------------------------------ state

    def add_state(
        self,
        name: str,
        shape: Sequence[int] = (),
        initializer: Any = "zeros",
        dtype: str = "float32",
        **kwargs: Any,
    ) -> keras.Variable:
        """Create a state variable: non-trainable, never autocast.

        Args:
            name: Name of the variable, unique within the layer.
            shape: Shape of the variable. Defaults to `()` (a scalar).
            initializer: Keras initializer (name, instance or callable), also
                used by `reset_state()`. Defaults to `"zeros"`. Use a seeded
                initializer for random values that `reset_state()` restores.
            dtype: Dtype of the variable, independent of the layer's dtype
                policy. Defaults to `"float32"`.
            **kwargs: Further `add_weight` arguments (e.g. `aggregation`).

        Returns:
            The new `keras.Variable`, also listed in `layer.state_variables`.
        """
        for forbidden in ("trainable", "autocast"):
            if forbidden in kwargs:
                raise ValueError(
                    f"Layer '{self.name}': add_state() creates non-trainable, "
                    f"non-autocast variables; received {forbidden}="
                    f"{kwargs[forbidden]!r}. For a trainable weight write "
                    "`self.add_weight(...)` instead."
                )
        initializer = keras.initializers.get(initializer)
        variable = self.add_weight(
            name=name,
            shape=tuple(shape),
            dtype=dtype,
            initializer=initializer,
            trainable=False,
            autocast=False,
            **kwargs,
        )
        self._state_variables.append(variable)
        self._state_initializers[id(variable)] = initializer
        return variable

    @property
    def state_variables(self) -> list[keras.Variable]:
        """The variables created with `add_state()`, in creation order."""
        return list(self._state_variables)

    @property
    def skipped_updates(self) -> int:
        """How many updates were skipped because a new value was not finite."""
        return int(ops.convert_to_numpy(self._skipped_updates))

    @property
    def state_frozen(self) -> bool:
        """Whether `freeze_state()` is in force."""
        return not bool(ops.convert_to_numpy(self._state_updates_enabled))

    def freeze_state(self) -> None:
        """Stop state updates while the layer keeps training (and is saved so)."""
        self._state_updates_enabled.assign(False)

    def unfreeze_state(self) -> None:
        """Resume state updates stopped by `freeze_state()`."""
        self._state_updates_enabled.assign(True)

    def reset_state(self) -> None:
        """Re-initialise every state variable with its initializer.

        The counter of skipped updates and the frozen switch are left as they
        are.
        """
        for variable in self._state_variables:
            initializer = self._state_initializers[id(variable)]
            variable.assign(initializer(variable.shape, dtype=variable.dtype))

    def calibration(self) -> contextlib.AbstractContextManager[None]:
        """A context in force while `keras_stateful.calibrate` runs the data.

        Override it when recomputing the state from scratch calls for other
        settings (e.g. `MovingMoments` switches to the cumulative average).
        Defaults to a context that changes nothing.
        """
        return contextlib.nullcontext()

    # ------------------------------------------------------ accumulation

    def add_statistic(
        self, name: str, shape: Sequence[int] = (), *, kind: str = "sum"
    ) -> None:
        """Declare a sufficient statistic of the update (in `build`).

        With `accumulation_steps > 1` it gets an accumulator (state named
        `accumulated_<name>`, float32) that `accumulate` adds each
        micro-batch to; with 1 nothing is created.

        Args:
            name: The key the statistic has in `accumulate`'s dict.
            shape: Its shape. Defaults to `()`.
            kind: How micro-batches combine: `"sum"` (counts, sums), `"min"`
                or `"max"` (ranges). Defaults to `"sum"`. `accumulate` may
                also be given a `merge` function for statistics that do not
                simply add (e.g. moments merged with Chan's method).
        """
        self._window.declare(name, tuple(shape), kind)
        if self.accumulation_steps > 1:
            self._window.create(self)

    def accumulate(
        self,
        statistics: dict[str, Tensor],
        *,
        training: bool | Tensor | None,
        merge: Any = None,
    ) -> dict[str, Tensor]:
        """This micro-batch's statistics merged into its window's.

        Call it under `may_update(training)`, then compute the new state from
        what it returns and commit it as usual: with `accumulation_steps=1`
        it returns `statistics` unchanged; otherwise the window's statistics
        so far, this micro-batch included, and the next `commit_state` of
        this call stores the state only at the window's last micro-batch
        (and the accumulators always).

        Args:
            statistics: The statistics declared with `add_statistic`, as
                tensors of their shapes (already reduced over replicas).
            training: The call's `training` argument.
            merge: `None` to combine each statistic by its kind, or
                `merge(window, batch) -> dict` for all of them together.
                Defaults to `None`.

        Returns:
            The statistics to compute the update from.
        """
        if self.accumulation_steps == 1 or not self.may_update(training):
            return statistics
        return self._window.merge(statistics, self.accumulation_steps, merge)

    @property
    def window_step_variable(self) -> keras.Variable | None:
        """The micro-batch counter of the open window (None without accumulation)."""
        return self._window.step

    def set_accumulation_steps(self, n: int) -> None:
        """Set `accumulation_steps`, creating the accumulators if needed.

        Call it before training with it (after `compile`, before `fit`);
        `keras_stateful.set_accumulation_steps(model)` does it for a model.
        """
        self.accumulation_steps = _check_accumulation_steps(n, self)
        if self.accumulation_steps > 1 and self._window.specs:
            with _backend.new_state_allowed(self):
                self._window.create(self)

    # ------------------------------------------------------------ logged values

    def add_logged_value(self, name: str) -> None:
        """Declare a value that `call()` reports with `log_value(name, ...)`.

        The layer keeps its running mean (a weighted sum and a count) in two
        float32 accumulators beside the weights, like a Keras metric's: they
        are in `layer.variables`, so `fit` carries them on every backend (JAX
        included), but not in `layer.weights`, `get_weights()` or a saved
        file. `keras_stateful.LogLayerValues` shows the mean in the `fit` and
        `evaluate` logs under `name`. (A layer-owned `keras.metrics.Mean`
        cannot do this on JAX in Keras 3: the JAX trainer does not carry
        metric variables through the forward pass, keras-team/keras#21639.)

        Args:
            name: The key in the logs, e.g. the layer's name.
        """
        weights_so_far = len(self._non_trainable_variables)
        self._logged_values.declare(name, weights_so_far)

    def log_value(
        self, name: str, value: Tensor, count: Any = 1, *, training: Any = _FROM_CALL
    ) -> None:
        """Add `value` (a scalar, weighted by `count` samples) to a logged mean.

        Recorded only in a training call and during evaluation (Keras's
        `evaluate` with `LogLayerValues` attached, or inside
        `keras_stateful.evaluation_logging()`); in `predict` and any other
        call with `training=False` or `None` nothing is written. It never
        touches the state, the weights or the gradient. Inside a user's own
        `jax.jit` (outside `stateless_call`) nothing is recorded.

        Args:
            name: A name declared with `add_logged_value`.
            value: A scalar tensor.
            count: How many samples `value` stands for. Defaults to 1.
            training: The call's `training` argument. Defaults to the value of
                the Keras layer call now running.
        """
        if training is _FROM_CALL:
            training = _backend.current_training_flag()
        self._logged_values.record(name, value, count, training)

    def logged_values(self) -> dict[str, float]:
        """The running means since the last reset, by name (NaN if none seen)."""
        return logged_values.means(self._logged_values.sums())

    def reset_logged_values(self) -> None:
        """Start the running means of `logged_values()` again from nothing."""
        self._logged_values.reset()

    @property
    def logged_variables(self) -> list[keras.Variable]:
        """The accumulators of the logged values: in `variables`, not `weights`."""
        logged = getattr(self, "_logged_values", None)  # None inside __init__
        return logged.variables if logged else []

    @property
    def variables(self) -> list[keras.Variable]:
        """Every variable of the layer: weights, seeds and logging accumulators."""
        return [*super().variables, *self.logged_variables]

    def load_own_variables(self, store: Any) -> None:
        expected = len(self._trainable_variables) + len(self._non_trainable_variables)
        legacy = [
            len(self._trainable_variables) + position
            for position in self._logged_values.legacy_positions
        ]
        store = logged_values.without_legacy_entries(store, legacy, expected)
        super().load_own_variables(store)

    # ----------------------------------------------------------------- update

    def may_update(self, training: bool | Tensor | None) -> bool:
        """Whether this call can update the state, known before it runs.

        False when `training` is `None` or a Python `False`, or the layer is
        not trainable: `commit_state()` will then change nothing. True for a
        Python `True` or a boolean tensor (decided when the graph runs, as is
        `freeze_state()`). Compute the new values, and run their
        cross-replica reductions, only when it is True: inference then does
        no update work and no communication, so one replica may predict
        alone (e.g. rank 0 only, under `torch.distributed`).

        Example:

        ```python
        from keras_stateful.distributed import cross_replica_sum


        class ReplicaMean(keras_stateful.StatefulLayer):
            def build(self, input_shape):
                self.mean = self.add_state("mean", (input_shape[-1],))

            def call(self, inputs, training=None):
                if self.may_update(training):  # inference: no reductions at all
                    total = cross_replica_sum(ops.sum(inputs, axis=0))
                    count = cross_replica_sum(ops.shape(inputs)[0] * 1.0)
                    self.commit_state((self.mean, total / count), training=training)
                return inputs


        layer = ReplicaMean()
        layer(np.ones((4, 3)))  # not training: nothing computed, nothing reduced
        layer(np.ones((4, 3)), training=True)  # layer.mean: [1., 1., 1.]
        ```
        """
        if training is None:
            return False
        if ops.is_tensor(training):
            return self.trainable
        if not isinstance(training, (bool, int)) and not hasattr(training, "dtype"):
            raise TypeError(
                f"Layer '{self.name}': `training` must be a bool, None or "
                f"a boolean tensor; received {training!r}. {_TRAINING_HELP}"
            )
        return self.trainable and bool(training)

    def commit_state(
        self,
        *updates: tuple[keras.Variable, Tensor] | tuple[keras.Variable, Tensor, Tensor],
        training: bool | Tensor | None,
        finite: Tensor | None = None,
    ) -> None:
        """Store new values in state variables when the layer is updating.

        The values of one call are committed together: either all of them
        (the layer is updating and every value is finite) or none. Reading
        a state variable after `commit_state` in the same call gives the
        value now stored, on every backend (the new one, or the old one when
        the layer did not update); `FakeQuant` and `RunningStandardization`
        use that to work with the range and statistics including the batch.
        A tensor read *before* the commit keeps its value on JAX and
        TensorFlow, but on PyTorch one that shares the variable's storage
        (the variable's own `.value`) shows the new value afterwards: copy it
        (`ops.copy`) before committing if the layer returns it.

        Args:
            *updates: `(variable, new_value)` pairs, where `new_value` has the
                variable's shape, or `(variable, indices, rows)` triples that
                set `variable[indices] = rows` and leave the other rows
                alone, at a cost that does not grow with the variable's
                first dimension. Indices must lie in `[0, variable.shape[0])`
                (mask invalid ones before committing) and rows of duplicate
                indices must be identical. Values are cast to the variable's
                dtype and cut from the gradient.
            training: The `training` argument of `call()`: a Python bool,
                `None` (not training) or a boolean scalar tensor.
            finite: Whether every new value is finite, as a boolean scalar
                tensor the layer computed more cheaply than a check of each
                value (e.g. from the values it combined); the guard then
                uses it instead. It must be exact. Defaults to `None` (the
                values are checked).
        """
        checked = [self._check_update(update) for update in updates]
        if not checked:
            return
        gate = self._update_gate(training)
        if gate is None:
            return
        window, self._window.pending = self._window.pending, None
        in_place = _backend.writes_in_place()
        new_values = [self._stored_form(v, value, in_place) for v, _, value in checked]
        if in_place and window is None and _backend.on_host(new_values):
            self._commit_decided_on_host(checked, new_values, gate, finite)
            return
        when = gate if window is None else gate & window.closes
        skipped = None
        if self.guard_non_finite:
            if finite is None:
                finite = _all_finite(new_values, in_place)
            if finite is not None:
                skipped = when & ~finite
                when = when & finite
        if window is not None:
            dropped = gate & ~window.finite
            skipped = dropped if skipped is None else skipped | dropped
            self._write(self._window.next_values(window), gate)
        if skipped is not None:
            self._count(skipped, in_place)
        self._write(
            [
                (v, i, value)
                for (v, i, _), value in zip(checked, new_values, strict=True)
            ],
            when,
            in_place,
        )

    def _commit_decided_on_host(
        self,
        checked: list[tuple[keras.Variable, Tensor | None, Tensor]],
        new_values: list[Tensor],
        gate: Tensor,
        finite: Tensor | None,
    ) -> None:
        """The commit with its decision read into Python (eager, on the CPU).

        There reading a flag costs less than the masked writes and flag
        arithmetic of the general path: the values are copied only when the
        update is made, and the skipped counter moves only on a skip. The
        results are the same.
        """
        if not bool(gate):
            return
        if self.guard_non_finite:
            if finite is None:
                finite = _backend.all_finite_on_host(new_values)
            if finite is not None and not bool(finite):
                _backend.count_in_place(self._skipped_updates, True)
                return
        updates = [
            (v, i, value) for (v, i, _), value in zip(checked, new_values, strict=True)
        ]
        self._write(updates, True, in_place=True)

    def _stored_form(
        self, variable: keras.Variable, value: Tensor, in_place: bool
    ) -> Tensor:
        """`value` cut from the gradient and cast to `variable`'s dtype."""
        if in_place:
            return _backend.stored_form(variable, value)
        value = ops.stop_gradient(ops.cast(value, variable.dtype))
        _backend.check_assignable(value, self.name)
        return value

    def _count(self, skipped: Tensor, in_place: bool) -> None:
        """One more skipped update where `skipped` holds."""
        if in_place:
            _backend.count_in_place(self._skipped_updates, skipped)
            return
        self._skipped_updates.assign(
            next_count(self._skipped_updates, ops.cast(skipped, "int32"))
        )

    def _write(
        self,
        updates: Sequence[tuple[Any, ...]],
        gate: Tensor,
        in_place: bool | None = None,
    ) -> None:
        """Store each new value where `gate` holds, else keep the old one."""
        if in_place is None:
            in_place = _backend.writes_in_place()
        triples = []
        for update in updates:
            variable, *rest = update
            indices = rest[0] if len(rest) == 2 else None
            triples.append(
                (variable, indices, self._stored_form(variable, rest[-1], in_place))
            )
        if in_place:
            _backend.write_where_in_place(triples, gate)
            return
        for variable, indices, value in triples:
            if indices is None:
                old = _backend.read_value(variable)
                _backend.assign(variable, ops.where(gate, value, old))
            else:
                old = _backend.read_rows(variable, indices)
                _backend.assign_rows(variable, indices, ops.where(gate, value, old))

    def add_update(self, updates: Any, inputs: Any = None) -> None:
        """Keras-2 compatible spelling of `commit_state()`.

        `self.add_update((self.centers, new_centers), x)` commits under the
        same rules as `commit_state`, with `training` taken from the current
        layer call (so the `call` signature needs no `training` argument).
        `inputs` is accepted and ignored: in Keras 3 an update belongs to the
        call that commits it.

        Args:
            updates: A `(variable, new_value)` pair or a list of such pairs.
            inputs: Ignored; kept so Keras-2 code runs unchanged.
        """
        del inputs
        if isinstance(updates, tuple) and len(updates) == 2:
            updates = [updates]
        if callable(updates) or not isinstance(updates, (list, tuple)):
            raise TypeError(
                f"Layer '{self.name}': add_update() takes a (variable, "
                "new_value) pair or a list of pairs; received "
                f"{type(updates).__name__}. Write "
                "`self.add_update((self.my_state, new_value))` or, better, "
                "`self.commit_state((self.my_state, new_value), "
                "training=training)`."
            )
        self.commit_state(*updates, training=_backend.current_training_flag())

    # Whether a call may save a state variable's own storage for its backward
    # pass (PyTorch), which the commit's in-place write would then corrupt:
    # `protect_state_reads` copies what autograd saves. A built-in layer
    # that provably never does (its state read only as the old value of an
    # EMA against a Python number, or after its commit) turns it off.
    _state_reads_need_protection = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._window.pending = None  # what `accumulate` notes lives one call
        if not self._state_reads_need_protection:
            return super().__call__(*args, **kwargs)
        with _backend.protect_state_reads(self):
            return super().__call__(*args, **kwargs)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "guard_non_finite": self.guard_non_finite,
            "accumulation_steps": self.accumulation_steps,
        }

    # --------------------------------------------------------------- helpers

    def _check_update(
        self, update: Any
    ) -> tuple[keras.Variable, Tensor | None, Tensor]:
        """Validate one update; returns (variable, indices or None, value)."""
        if not (isinstance(update, (tuple, list)) and len(update) in (2, 3)):
            raise TypeError(
                f"Layer '{self.name}': commit_state() takes (variable, "
                "new_value) pairs or (variable, indices, rows) triples; "
                f"received {update!r}. Write `self.commit_state((self.my_state, "
                "new_value), training=training)`."
            )
        variable, *rest = update
        if not isinstance(variable, keras.Variable):
            raise TypeError(
                f"Layer '{self.name}': the first item of each commit_state() "
                f"update must be a keras.Variable; received "
                f"{type(variable).__name__}. Create state with "
                "`self.add_state(name, shape)` in build()."
            )
        if variable.trainable:
            raise ValueError(
                f"Layer '{self.name}': cannot commit a value to trainable "
                f"variable '{variable.path}'. The optimizer owns trainable "
                "variables, and on JAX a direct assign to one is silently "
                "dropped. Create the state with `self.add_state(...)`."
            )
        indices = None
        expected = tuple(variable.shape)
        if len(rest) == 2:
            indices = ops.convert_to_tensor(rest[0])
            dtype = keras.backend.standardize_dtype(indices.dtype)
            if len(indices.shape) != 1 or "int" not in dtype:
                raise ValueError(
                    f"Layer '{self.name}': row indices for '{variable.path}' "
                    "must be a 1-D integer tensor; received shape "
                    f"{tuple(indices.shape)} and dtype {dtype}. Pass e.g. "
                    '`ops.cast(ids, "int32")`.'
                )
            expected = (indices.shape[0], *expected[1:])
        value = _backend.as_tensor_for(variable, rest[-1])
        shape = tuple(value.shape)
        if len(shape) != len(expected) or any(
            a is not None and b is not None and a != b
            for a, b in zip(shape, expected, strict=True)
        ):
            raise ValueError(
                f"Layer '{self.name}': new value for '{variable.path}' has "
                f"shape {shape}, expected {expected}. Reduce or reshape it to "
                "the state's shape before committing."
            )
        return variable, indices, value

    def _update_gate(self, training: Any) -> Tensor | None:
        """None when the layer cannot update in this call, else a bool tensor."""
        if not self.may_update(training):
            return None
        if not ops.is_tensor(training):
            return self._updates_enabled()
        training = ops.cast(training, "bool")
        if len(training.shape) != 0:
            raise ValueError(
                f"Layer '{self.name}': a tensor `training` must be a scalar; "
                f"received shape {tuple(training.shape)}."
            )
        return training & self._updates_enabled()

    def _updates_enabled(self) -> Tensor:
        """The `freeze_state` switch as a bool tensor (False when frozen)."""
        return _backend.read_value(self._state_updates_enabled)  # stored as bool


def next_count(counter: keras.Variable, step: Any = 1) -> Tensor:
    """`counter + step` for an int32 counter, stopping at 2**31 - 1 (no wrap)."""
    current = _backend.read_value(counter)
    if isinstance(step, int) and step == 1 and _backend.writes_in_place():
        return _backend.next_count_in_place(current)
    return current + ops.minimum(
        ops.cast(step, "int32"), _backend.COUNTER_LIMIT - current
    )


def find_stateful_layers(model: keras.layers.Layer) -> list[StatefulLayer]:
    """Every `StatefulLayer` in `model` (itself included), nested ones too.

    Args:
        model: A Keras model or layer.

    Returns:
        The stateful layers, `model` first if it is one, then in the order
        Keras lists nested layers.

    Example:

    ```python
    average = keras_stateful.layers.MovingAverage()
    model = keras.Sequential([keras.Input((4,)), average, keras.layers.Dense(1)])
    keras_stateful.find_stateful_layers(model)  # [average]
    ```
    """
    layers = _backend.flatten_layers(model)
    return [layer for layer in layers if isinstance(layer, StatefulLayer)]


def _all_finite(values: list[Tensor], in_place: bool = False) -> Tensor | None:
    """A scalar bool tensor: all float values finite; None if none is float."""
    if in_place:
        return _backend.all_finite_in_place(values)
    checks = [
        ops.all(ops.isfinite(value))
        for value in values
        if keras.backend.is_float_dtype(value.dtype)
    ]
    if not checks:
        return None
    finite = checks[0]
    for check in checks[1:]:
        finite = ops.logical_and(finite, check)
    return finite


def _check_accumulation_steps(n: Any, layer: keras.layers.Layer) -> int:
    """`n` as an int >= 1, or a clear error."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(
            f"Layer '{layer.name}': accumulation_steps must be an int >= 1 (the "
            f"micro-batches per optimizer step); received {n!r}. Write e.g. "
            "`accumulation_steps=4`, or `keras_stateful.set_accumulation_steps"
            "(model)` to take the optimizer's gradient_accumulation_steps."
        )
    return int(n)
