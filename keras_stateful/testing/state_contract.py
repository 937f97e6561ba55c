"""`check_state_contract`: the state contract of a `StatefulLayer`, checked."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_stateful import _backend
from keras_stateful.stateful_layer import StatefulLayer

Arrays = list[np.ndarray]
Snapshot = dict[str, np.ndarray]


PROMISES = (
    "eager",
    "stateless_call",
    "fit",
    "no_gradient",
    "save_load",
    "inference",
    "mixed_precision",
    "reset_state",
)


def check_state_contract(
    layer_factory: Callable[[], StatefulLayer],
    inputs: np.ndarray | Sequence[np.ndarray],
    *,
    jit_compile_modes: Sequence[bool | str] = ("auto", False),
    mixed_precision_policies: Sequence[str] = ("mixed_float16", "mixed_bfloat16"),
    skip: Collection[str] = (),
    rtol: float = 1e-5,
    atol: float = 1e-6,
    mixed_precision_tolerance: float = 2e-2,
) -> None:
    """Check, on the current backend, that a layer's state behaves as promised.

    The layer is called on two halves of `inputs` (two training steps) and
    its state after each step, computed eagerly, is the reference for eight
    promises, checked in this order and named in `skip` and in failures:

    1. `"eager"`: an eager call with `training=True` updates the state, and
       `training=False`, no `training`, `freeze_state()` and
       `trainable=False` leave it untouched; a committed value carries no
       autograd history;
    2. `"stateless_call"`: `stateless_call(..., training=True)` returns the
       same new state and leaves the layer's variables untouched (for a
       layer whose `call` takes `training`; a Keras-2 style layer using
       `add_update` learns it from the enclosing call and is checked
       through `fit` instead);
    3. `"fit"`: `model.fit` updates the state exactly once per step, for
       each `jit_compile` mode; it does not after `freeze_state()` or with
       `trainable=False`;
    4. `"no_gradient"`: no gradient reaches a state variable: state is
       non-trainable, and a `fit` step with a large learning rate leaves it
       at the reference;
    5. `"save_load"`: a `.keras` save and load keeps the state bit for bit,
       and the loaded model predicts the same;
    6. `"inference"`: inference writes nothing. Every variable of the model
       (weights, state, seeds, logging accumulators) and of its optimizer
       stays bit for bit through `predict`, `predict_on_batch`, calls with
       `training=False` and without `training`, and, on TensorFlow, through
       `model.export` and calls of the exported serving function (whose
       own variables stay too); `evaluate` changes no weight
       (`model.weights`, `get_weights()`);
    7. `"mixed_precision"`: under each policy the state keeps its float32
       dtype, stays finite and does update under `fit`, close to the
       float32 run;
    8. `"reset_state"`: `reset_state()` restores the state the layer had
       when it was built, after `fit` in each `jit_compile` mode.

    In `fit` the layer sits in a functional model: float inputs are first
    multiplied by a trainable scalar (initially 1, so the layer sees
    `inputs` exactly) and the outputs are reduced to one score per sample
    with an MSE loss against zeros.

    Args:
        layer_factory: Returns a new, unbuilt layer; called several times.
            Random initializers must be seeded, or `reset_state()` cannot
            restore the initial state (weights are otherwise copied between
            the instances).
        inputs: One batch: an array, or a list of arrays for a layer called
            on a list (e.g. `[features, labels]`). The batch size must be even
            and at least 2; it is split into two steps.
        jit_compile_modes: `jit_compile` values to run `fit` with. Defaults to
            `("auto", False)`; a mode that compiles to the same as an earlier
            one is run once (`"auto"` is eager on TensorFlow and PyTorch on
            CPU). `True` on PyTorch means `torch.compile`.
        mixed_precision_policies: Policies to run `fit` under. Defaults to
            `("mixed_float16", "mixed_bfloat16")`; `()` skips the check.
        skip: Names of promises not to check (see above), e.g.
            `("save_load",)` for a layer that cannot be saved. Defaults to
            `()`.
        rtol: Relative tolerance between eager and compiled states.
            Defaults to `1e-5`.
        atol: Absolute tolerance between eager and compiled states.
            Defaults to `1e-6`.
        mixed_precision_tolerance: Relative and absolute tolerance between
            the mixed-precision and the float32 states. Defaults to `2e-2`.

    Raises:
        AssertionError: Naming the broken promise and the values seen.

    Example:

    ```python
    from keras_stateful.testing import check_state_contract

    def test_my_layer():
        check_state_contract(lambda: MyLayer(units=4), np.random.rand(8, 3))
    ```
    """
    unknown = sorted(set(skip) - set(PROMISES))
    if unknown:
        raise ValueError(
            f"check_state_contract: unknown promise(s) in skip: {unknown}. "
            f"Choose from {list(PROMISES)}, e.g. skip=('save_load',)."
        )
    record = _Record.make(layer_factory, inputs, jit_compile_modes, rtol, atol)
    checks: dict[str, Callable[[], None]] = {
        "eager": lambda: check_eager_gate(record),
        "stateless_call": lambda: check_stateless_call(record),
        "fit": lambda: check_fit_updates_once(record),
        "no_gradient": lambda: check_no_gradient(record),
        "save_load": lambda: check_save_load(record),
        "inference": lambda: check_inference_writes_nothing(record),
        "mixed_precision": lambda: check_mixed_precision(
            record, mixed_precision_policies, mixed_precision_tolerance
        ),
        "reset_state": lambda: check_reset_state(record),
    }
    for number, name in enumerate(PROMISES, start=1):
        if name not in skip:
            with _promise(number, name):
                checks[name]()


# ------------------------------------------------------------ the reference


@dataclasses.dataclass
class _Record:
    """What every promise is checked against: the steps and eager states."""

    factory: Callable[[], StatefulLayer]
    arrays: Arrays
    multi: bool
    steps: list[Arrays]
    initial_weights: Arrays
    initial: Snapshot
    after_one: Snapshot
    after_two: Snapshot
    jit_compile_modes: Sequence[bool | str]
    rtol: float
    atol: float
    _fitted: dict[Any, tuple[keras.Model, StatefulLayer]] = dataclasses.field(
        default_factory=dict
    )

    @classmethod
    def make(
        cls,
        factory: Callable[[], StatefulLayer],
        inputs: Any,
        jit_compile_modes: Sequence[bool | str],
        rtol: float,
        atol: float,
    ) -> _Record:
        arrays, multi = _as_arrays(inputs)
        size = arrays[0].shape[0]
        if size < 2 or size % 2:
            raise ValueError(
                "check_state_contract: the batch of `inputs` is split into two "
                "training steps, so its size must be even and >= 2; received "
                f"{size}."
            )
        half = size // 2
        steps = [[a[:half] for a in arrays], [a[half:] for a in arrays]]
        reference = factory()
        _expect(
            isinstance(reference, StatefulLayer),
            f"layer_factory must return a StatefulLayer; got {type(reference)}.",
        )
        _call(reference, steps[0], multi, training=False)
        initial_weights = reference.get_weights()
        initial = state_snapshot(reference)
        _expect(bool(initial), "the layer has no state: add it with add_state().")
        _call(reference, steps[0], multi, training=True)
        after_one = state_snapshot(reference)
        _call(reference, steps[1], multi, training=True)
        after_two = state_snapshot(reference)
        _expect(
            not _same(after_two, initial),
            "two training calls left the state unchanged; is commit_state() "
            "given `training=training`?",
        )
        return cls(
            factory, arrays, multi, steps, initial_weights, initial, after_one,
            after_two, _distinct_modes(jit_compile_modes), rtol, atol,
        )  # fmt: skip

    @property
    def half(self) -> int:
        return self.arrays[0].shape[0] // 2

    @property
    def full_batch(self) -> Any:
        return self.arrays if self.multi else self.arrays[0]

    def call(self, layer: StatefulLayer, batch: Arrays, **kwargs: Any) -> Any:
        return _call(layer, batch, self.multi, **kwargs)

    def fresh(self) -> StatefulLayer:
        """A new layer, built, with the reference's initial weights."""
        layer = self.factory()
        self.call(layer, self.steps[0], training=False)
        layer.set_weights(self.initial_weights)
        return layer

    def probe(self) -> tuple[keras.Model, StatefulLayer]:
        return _probe(self.fresh(), self.arrays, self.multi)

    def fit(
        self, model: keras.Model, jit_compile: bool | str, learning_rate: float = 0.0
    ) -> None:
        _fit(
            model, self.full_batch, self.half, jit_compile, learning_rate=learning_rate
        )

    def fitted(self, jit_compile: bool | str) -> tuple[keras.Model, StatefulLayer]:
        """A probe fitted on both steps (learning rate 0), made once per mode."""
        if jit_compile not in self._fitted:
            model, layer = self.probe()
            self.fit(model, jit_compile)
            self._fitted[jit_compile] = (model, layer)
        return self._fitted[jit_compile]


def _distinct_modes(modes: Sequence[bool | str]) -> tuple[bool | str, ...]:
    """The modes, less those that compile to the same as an earlier one.

    `"auto"` is XLA on JAX but eager on TensorFlow and PyTorch on CPU, where
    `("auto", False)` would run the same program twice.
    """
    distinct: dict[bool, bool | str] = {}
    for mode in modes:
        distinct.setdefault(_resolved_jit_compile(mode), mode)
    return tuple(distinct.values())


def _resolved_jit_compile(mode: bool | str) -> bool:
    if mode != "auto":
        return bool(mode)
    probe = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    probe.compile(loss="mse", jit_compile="auto")
    return bool(probe.jit_compile)


# ------------------------------------------------------------- the promises


def check_eager_gate(record: _Record) -> None:
    """1. Eager calls update only with `training=True`, unfrozen, trainable."""
    layer, first = record.fresh(), record.steps[0]
    record.call(layer, first, training=False)
    _expect_state(layer, record.initial, "after a call with training=False")
    record.call(layer, first)
    _expect_state(layer, record.initial, "after a call without `training`")
    layer.freeze_state()
    _expect(layer.state_frozen, "freeze_state() did not set state_frozen.")
    record.call(layer, first, training=True)
    _expect_state(layer, record.initial, "after a training call when frozen")
    layer.unfreeze_state()
    layer.trainable = False
    record.call(layer, first, training=True)
    _expect_state(layer, record.initial, "after a training call with trainable=False")
    layer.trainable = True
    record.call(layer, first, training=True)
    _expect_state(
        layer, record.after_one, "after unfreeze and a training call",
        record.rtol, record.atol,
    )  # fmt: skip
    for variable in layer.state_variables:
        value = variable.value
        _expect(
            not getattr(value, "requires_grad", False)
            and getattr(value, "grad_fn", None) is None,
            f"state '{variable.path}' carries autograd history after a commit.",
        )


def check_stateless_call(record: _Record) -> None:
    """2. `stateless_call` returns the new state and touches no variable.

    It calls `call()` directly, so only a layer whose `call` takes
    `training` can be told to train through it.
    """
    layer = record.fresh()
    if "training" not in inspect.signature(layer.call).parameters:
        return
    batch = [ops.convert_to_tensor(a) for a in record.steps[0]]
    _, new_values = layer.stateless_call(
        [_tensor(v) for v in layer.trainable_variables],
        [_tensor(v) for v in layer.non_trainable_variables],
        batch if record.multi else batch[0],
        training=True,
    )
    _expect_state(layer, record.initial, "after stateless_call (variables touched)")
    by_id = {
        id(v): ops.convert_to_numpy(value)
        for v, value in zip(layer.non_trainable_variables, new_values, strict=True)
    }
    variables = layer.state_variables
    stateless_state = {
        key: by_id[id(v)]
        for key, v in zip(_state_keys(variables), variables, strict=True)
    }
    _expect_close(
        stateless_state, record.after_one, "stateless_call's new state",
        record.rtol, record.atol,
    )  # fmt: skip


def check_fit_updates_once(record: _Record) -> None:
    """3. `fit` updates once per step; not when frozen or not trainable."""
    for mode in record.jit_compile_modes:
        _, layer = record.fitted(mode)
        _expect_state(
            layer, record.after_two, f"after fit(jit_compile={mode!r})",
            record.rtol, record.atol,
        )  # fmt: skip
    mode = record.jit_compile_modes[0]
    model, layer = record.probe()
    layer.freeze_state()
    record.fit(model, mode)
    _expect_state(layer, record.initial, "after fit with the state frozen")
    model, layer = record.probe()
    layer.trainable = False
    record.fit(model, mode)
    _expect_state(layer, record.initial, "after fit with trainable=False")


def check_no_gradient(record: _Record) -> None:
    """4. A real optimizer step leaves the state to the layer's own rule."""
    model, layer = record.probe()
    trainable_ids = {id(v) for v in model.trainable_variables}
    for variable in layer.state_variables:
        _expect(
            not variable.trainable and id(variable) not in trainable_ids,
            f"state '{variable.path}' is trainable: the optimizer would update it.",
        )
    first = record.steps[0] if record.multi else record.steps[0][0]
    _fit(model, first, record.half, record.jit_compile_modes[0], learning_rate=0.5)
    _expect_state(
        layer, record.after_one, "after an SGD step (lr=0.5)", record.rtol, record.atol
    )


def check_save_load(record: _Record) -> None:
    """5. A `.keras` round trip keeps the state bit for bit and the predictions."""
    with tempfile.TemporaryDirectory() as tmp:
        for mode in record.jit_compile_modes:
            model, layer = record.fitted(mode)
            what = f"fit(jit_compile={mode!r})"
            predictions = _predict(model, record)
            path = os.path.join(tmp, f"probe_{mode}.keras")
            model.save(path)
            loaded = keras.saving.load_model(path)
            loaded_layer = loaded.get_layer(layer.name)
            _expect_state(
                loaded_layer, state_snapshot(layer), f"after .keras save/load ({what})"
            )
            np.testing.assert_allclose(
                _predict(loaded, record),
                predictions,
                rtol=1e-6,
                atol=1e-6,
                err_msg="the loaded model predicts differently",
            )


def check_inference_writes_nothing(record: _Record) -> None:
    """6. No inference route writes any variable; `evaluate` no weight."""
    for mode in record.jit_compile_modes:
        model, _ = record.fitted(mode)
        what = f"under fit(jit_compile={mode!r})"
        before = variables_snapshot(model)
        for route, run in _inference_routes(model, record).items():
            run()
            _expect_unchanged(variables_snapshot(model), before, f"{route} {what}")
        weights = model.get_weights()
        model.evaluate(
            record.full_batch, _targets(record.arrays), batch_size=record.half,
            verbose=0,
        )  # fmt: skip
        _expect_unchanged(
            _values(model.weights), _values_of(before, model.weights),
            f"evaluate {what} (model.weights)",
        )  # fmt: skip
        _expect(
            all(
                np.array_equal(a, b, equal_nan=True)
                for a, b in zip(model.get_weights(), weights, strict=True)
            ),
            f"evaluate {what} changed get_weights().",
        )
    if _backend.BACKEND == "tensorflow":
        _check_exported_serving(record, record.fitted(record.jit_compile_modes[0])[0])


def _inference_routes(
    model: keras.Model, record: _Record
) -> dict[str, Callable[[], Any]]:
    """Every way to run the model outside training, by name."""
    batch = record.full_batch
    return {
        "predict": lambda: _predict(model, record),
        "predict_on_batch": lambda: model.predict_on_batch(batch),
        "a call with training=False": lambda: model(batch, training=False),
        "a call without `training`": lambda: model(batch),
    }


def _check_exported_serving(record: _Record, model: keras.Model) -> None:
    """TensorFlow: exporting and serving write neither the model nor the export."""
    import tensorflow as tf

    before = variables_snapshot(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        _expect_unchanged(variables_snapshot(model), before, "model.export")
        served = tf.saved_model.load(tmp)
        exported = {v.name: np.array(v.numpy()) for v in served.variables}
        batch = [tf.constant(a) for a in record.arrays]
        for _ in range(2):
            served.serve(batch if record.multi else batch[0])
        after = {v.name: np.array(v.numpy()) for v in served.variables}
        _expect_unchanged(after, exported, "calls of the exported serving function")


def check_mixed_precision(
    record: _Record, policies: Sequence[str], tolerance: float
) -> None:
    """7. Under mixed precision the state stays float32, finite, and updates."""
    dtypes = {v.name: v.dtype for v in record.fresh().state_variables}
    for policy in policies:
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            model, layer = record.probe()
            record.fit(model, record.jit_compile_modes[0])
        finally:
            keras.config.set_dtype_policy(previous)
        for variable in layer.state_variables:
            _expect(
                variable.dtype == dtypes[variable.name],
                f"under {policy}, state '{variable.path}' has dtype "
                f"{variable.dtype}, expected {dtypes[variable.name]}.",
            )
        state = state_snapshot(layer)
        _expect(
            all(np.all(np.isfinite(v)) for v in state.values()),
            f"under {policy}, the state is not finite: {state}",
        )
        _expect(
            not _same(state, record.initial), f"under {policy}, fit did not update."
        )
        _expect_close(
            state, record.after_two, f"the state under {policy}", tolerance, tolerance
        )


def check_reset_state(record: _Record) -> None:
    """8. `reset_state()` restores the state the layer was built with."""
    for mode in record.jit_compile_modes:
        _, layer = record.fitted(mode)
        layer.reset_state()
        _expect_state(
            layer, record.initial, f"after reset_state() (fit(jit_compile={mode!r}))"
        )


# ---------------------------------------------------------------- the probe


@keras.saving.register_keras_serializable(package="keras_stateful.testing")
class ContractScale(keras.layers.Layer):
    """Multiplies its input by one trainable scalar (initially 1)."""

    def build(self, input_shape: Any) -> None:
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones")

    def call(self, inputs: Any) -> Any:
        return inputs * ops.cast(self.scale, inputs.dtype)


@keras.saving.register_keras_serializable(package="keras_stateful.testing")
class ContractScore(keras.layers.Layer):
    """Reduces any outputs to one float32 score per sample of the inputs.

    The layer's inputs enter with weight zero, so the trainable scale always
    has a gradient path, also for a layer whose outputs do not depend on its
    inputs differentiably (a queue returning stored keys).
    """

    def call(self, outputs: Any, inputs: Any) -> Any:
        total = ops.zeros((), "float32")
        for output in keras.tree.flatten(outputs):
            if keras.backend.is_float_dtype(output.dtype):
                total = total + ops.mean(ops.cast(output, "float32"))
        inputs = keras.tree.flatten(inputs)
        for tensor in inputs:
            if keras.backend.is_float_dtype(tensor.dtype):
                total = total + 0.0 * ops.mean(ops.cast(tensor, "float32"))
        return ops.ones((ops.shape(inputs[0])[0], 1), "float32") * total

    def compute_output_shape(self, outputs_shape: Any, inputs_shape: Any) -> Any:
        first = inputs_shape[0]
        return (first[0] if isinstance(first, (list, tuple)) else first, 1)


def _probe(
    layer: StatefulLayer, arrays: Arrays, multi: bool
) -> tuple[keras.Model, StatefulLayer]:
    model_inputs = [
        keras.Input(shape=a.shape[1:], dtype=str(a.dtype), name=f"input_{i}")
        for i, a in enumerate(arrays)
    ]
    layer_inputs = [
        ContractScale()(t) if np.issubdtype(a.dtype, np.floating) else t
        for t, a in zip(model_inputs, arrays, strict=True)
    ]
    outputs = layer(layer_inputs if multi else layer_inputs[0])
    score = ContractScore(dtype="float32")(outputs, layer_inputs)
    return keras.Model(model_inputs if multi else model_inputs[0], score), layer


def _fit(
    model: keras.Model,
    x: Any,
    batch_size: int,
    jit_compile: bool | str,
    *,
    learning_rate: float,
) -> None:
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss="mse",
        jit_compile=jit_compile,
    )
    arrays = x if isinstance(x, list) else [x]
    model.fit(
        x, _targets(arrays), batch_size=batch_size, epochs=1, shuffle=False, verbose=0
    )


def _targets(arrays: Arrays) -> np.ndarray:
    return np.zeros((arrays[0].shape[0], 1), "float32")


# ---------------------------------------------------------------- helpers


def _as_arrays(inputs: Any) -> tuple[Arrays, bool]:
    if isinstance(inputs, (list, tuple)):
        return [np.asarray(a) for a in inputs], True
    return [np.asarray(inputs)], False


def _tensor(variable: keras.Variable) -> Any:
    return ops.convert_to_tensor(np.asarray(ops.convert_to_numpy(variable)))


def state_snapshot(layer: StatefulLayer) -> Snapshot:
    """The layer's state variables as NumPy copies, by variable name.

    Example:

    ```python
    layer = keras_stateful.layers.MovingAverage(0.9)
    layer(np.ones((2, 3), "float32"), training=True)
    state_snapshot(layer)["average"]  # about [0.1, 0.1, 0.1]
    ```
    """
    variables = layer.state_variables
    return {
        key: np.array(ops.convert_to_numpy(v))
        for key, v in zip(_state_keys(variables), variables, strict=True)
    }


def _state_keys(variables: Sequence[keras.Variable]) -> list[str]:
    """Each variable's name; a repeated name (a layer made of stages that
    share variable names) gets `#1`, `#2`... for its later occurrences."""
    seen: dict[str, int] = {}
    keys = []
    for variable in variables:
        count = seen.get(variable.name, 0)
        seen[variable.name] = count + 1
        keys.append(variable.name if not count else f"{variable.name}#{count}")
    return keys


def variables_snapshot(model: keras.layers.Layer) -> Snapshot:
    """Every variable of `model` and of its optimizer, by path, as NumPy copies.

    Weights, state, random seeds and the accumulators of logged values:
    what must stay bit for bit through inference.

    Example:

    ```python
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras_stateful.layers.MovingAverage(0.9)(inputs))
    before = variables_snapshot(model)
    model.predict(np.ones((4, 3), "float32"), verbose=0)
    after = variables_snapshot(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # pure
    ```
    """
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        variables += list(optimizer.variables)
    return _values(variables)


def _values(variables: Sequence[keras.Variable]) -> Snapshot:
    return {v.path: np.array(ops.convert_to_numpy(v)) for v in variables}


def _values_of(snapshot: Snapshot, variables: Sequence[keras.Variable]) -> Snapshot:
    return {v.path: snapshot[v.path] for v in variables}


def _expect_unchanged(actual: Snapshot, expected: Snapshot, when: str) -> None:
    """Same variables, each bit for bit (NaN equal to NaN)."""
    _expect(
        actual.keys() == expected.keys(),
        f"{when} added or removed variables: {sorted(actual.keys() ^ expected.keys())}",
    )
    changed = [
        path
        for path in expected
        if not np.array_equal(actual[path], expected[path], equal_nan=True)
    ]
    _expect(not changed, f"{when} wrote variables {changed}.")


@contextlib.contextmanager
def _promise(number: int, name: str) -> Iterator[None]:
    """Name the promise in a failure: 'State contract broken (6. inference)'."""
    try:
        yield
    except AssertionError as error:
        message = str(error).replace("State contract broken: ", "", 1)
        raise AssertionError(
            f"State contract broken ({number}. {name}): {message} "
            f"(skip it with skip=({name!r},))"
        ) from None


def _call(layer: StatefulLayer, batch: Arrays, multi: bool, **kwargs: Any) -> Any:
    return layer(batch if multi else batch[0], **kwargs)


def _predict(model: keras.Model, record: _Record) -> Any:
    return model.predict(record.full_batch, batch_size=record.half, verbose=0)


def _same(a: Snapshot, b: Snapshot) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(f"State contract broken: {message}")


def _expect_state(
    layer: StatefulLayer,
    expected: Snapshot,
    when: str,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Exact comparison unless tolerances are given."""
    actual = state_snapshot(layer)
    _expect(
        actual.keys() == expected.keys(),
        f"{when}, the layer has state {sorted(actual)}, expected {sorted(expected)}.",
    )
    if rtol is None:
        for path in expected:
            _expect(
                np.array_equal(actual[path], expected[path]),
                f"state '{path}' {when}: expected {expected[path]!r}, "
                f"got {actual[path]!r}.",
            )
    else:
        _expect_close(actual, expected, f"state {when}", rtol, atol or 0.0)


def _expect_close(
    actual: Snapshot, expected: Snapshot, what: str, rtol: float, atol: float
) -> None:
    for path in expected:
        try:
            np.testing.assert_allclose(
                actual[path].astype("float64"),
                expected[path].astype("float64"),
                rtol=rtol,
                atol=atol,
            )
        except AssertionError as error:
            raise AssertionError(
                f"State contract broken: {what}, variable '{path}':\n{error}"
            ) from None
