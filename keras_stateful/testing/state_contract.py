"""`check_state_contract`: the state contract of a `StatefulLayer`, checked."""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_stateful.stateful_layer import StatefulLayer

Arrays = list[np.ndarray]
Snapshot = dict[str, np.ndarray]


def check_state_contract(
    layer_factory: Callable[[], StatefulLayer],
    inputs: np.ndarray | Sequence[np.ndarray],
    *,
    jit_compile_modes: Sequence[bool | str] = ("auto", False),
    mixed_precision_policies: Sequence[str] = ("mixed_float16", "mixed_bfloat16"),
    rtol: float = 1e-5,
    atol: float = 1e-6,
    mixed_precision_tolerance: float = 2e-2,
) -> None:
    """Check, on the current backend, that a layer's state behaves as promised.

    The layer is called on two halves of `inputs` (two training steps) and
    its state after each step, computed eagerly, is the reference for:

    1. an eager call with `training=True` updates the state, and
       `training=False`, no `training`, `freeze_state()` and
       `trainable=False` leave it untouched;
    2. `stateless_call(..., training=True)` returns the same new state and
       leaves the layer's variables untouched (for a layer whose `call` takes
       `training`; a Keras-2 style layer using `add_update` learns it from
       the enclosing call and is checked through `fit` instead);
    3. `model.fit` updates the state exactly once per step, for each
       `jit_compile` mode; `predict` and `evaluate` do not update it; nor does
       `fit` after `freeze_state()` or `trainable=False`;
    4. no gradient reaches a state variable: state is non-trainable, a `fit`
       step with a large learning rate leaves it at the reference, and a
       committed value carries no autograd history;
    5. a `.keras` save and load keeps the state bit for bit, and the loaded
       model predicts the same;
    6. under each mixed-precision policy the state keeps its float32 dtype,
       stays finite and does update under `fit`, close to the float32 run;
    7. `reset_state()` restores the state the layer had when it was built.

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
            `("auto", False)`. `True` on PyTorch means `torch.compile`.
        mixed_precision_policies: Policies to run `fit` under. Defaults to
            `("mixed_float16", "mixed_bfloat16")`; `()` skips the check.
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
    arrays, multi = _as_arrays(inputs)
    half = arrays[0].shape[0] // 2
    if arrays[0].shape[0] < 2 or arrays[0].shape[0] % 2:
        raise ValueError(
            "check_state_contract: the batch of `inputs` is split into two "
            f"training steps, so its size must be even and >= 2; received "
            f"{arrays[0].shape[0]}."
        )
    steps = [[a[:half] for a in arrays], [a[half:] for a in arrays]]

    def call(layer: StatefulLayer, batch: Arrays, **kwargs: Any) -> Any:
        return layer(batch if multi else batch[0], **kwargs)

    # The eager reference: the state after each of two training steps.
    reference = layer_factory()
    _expect(
        isinstance(reference, StatefulLayer),
        f"layer_factory must return a StatefulLayer; got {type(reference)}.",
    )
    call(reference, steps[0], training=False)
    initial_weights = reference.get_weights()
    initial = _snapshot(reference)
    _expect(bool(initial), "the layer has no state: add it with add_state().")
    call(reference, steps[0], training=True)
    after_one = _snapshot(reference)
    call(reference, steps[1], training=True)
    after_two = _snapshot(reference)
    _expect(
        not _same(after_two, initial),
        "two training calls left the state unchanged; is commit_state() "
        "given `training=training`?",
    )

    def fresh() -> StatefulLayer:
        layer = layer_factory()
        call(layer, steps[0], training=False)
        layer.set_weights(initial_weights)
        return layer

    # 1. Eager calls that must not update.
    layer = fresh()
    call(layer, steps[0], training=False)
    _expect_state(layer, initial, "after a call with training=False")
    call(layer, steps[0])
    _expect_state(layer, initial, "after a call without `training`")
    layer.freeze_state()
    _expect(layer.state_frozen, "freeze_state() did not set state_frozen.")
    call(layer, steps[0], training=True)
    _expect_state(layer, initial, "after a training call when frozen")
    layer.unfreeze_state()
    layer.trainable = False
    call(layer, steps[0], training=True)
    _expect_state(layer, initial, "after a training call with trainable=False")
    layer.trainable = True
    call(layer, steps[0], training=True)
    _expect_state(layer, after_one, "after unfreeze and a training call", rtol, atol)
    for variable in layer.state_variables:
        value = variable.value
        _expect(
            not getattr(value, "requires_grad", False)
            and getattr(value, "grad_fn", None) is None,
            f"state '{variable.path}' carries autograd history after a commit.",
        )

    # 2. stateless_call (it calls `call()` directly, so only a layer whose
    # `call` takes `training` can be told to train through it).
    layer = fresh()
    if "training" in inspect.signature(layer.call).parameters:
        batch = [ops.convert_to_tensor(a) for a in steps[0]]
        _, new_values = layer.stateless_call(
            [_tensor(v) for v in layer.trainable_variables],
            [_tensor(v) for v in layer.non_trainable_variables],
            batch if multi else batch[0],
            training=True,
        )
        _expect_state(layer, initial, "after stateless_call (variables touched)")
        by_id = {
            id(v): ops.convert_to_numpy(value)
            for v, value in zip(layer.non_trainable_variables, new_values, strict=True)
        }
        stateless_state = {v.name: by_id[id(v)] for v in layer.state_variables}
        _expect_close(
            stateless_state, after_one, "stateless_call's new state", rtol, atol
        )

    full_batch = arrays if multi else arrays[0]
    with tempfile.TemporaryDirectory() as tmp:
        # 3, 5 and 7: fit per jit mode, predict, evaluate, save/load, reset.
        for mode in jit_compile_modes:
            what = f"fit(jit_compile={mode!r})"
            model, layer = _probe(fresh(), arrays, multi)
            _fit(model, full_batch, half, mode, learning_rate=0.0)
            _expect_state(layer, after_two, f"after {what}", rtol, atol)
            state = _snapshot(layer)
            predictions = model.predict(full_batch, batch_size=half, verbose=0)
            _expect_state(layer, state, f"after predict under {what}")
            model.evaluate(full_batch, _targets(arrays), batch_size=half, verbose=0)
            _expect_state(layer, state, f"after evaluate under {what}")
            path = os.path.join(tmp, f"probe_{mode}.keras")
            model.save(path)
            loaded = keras.saving.load_model(path)
            loaded_layer = loaded.get_layer(layer.name)
            _expect_state(loaded_layer, state, f"after .keras save/load ({what})")
            np.testing.assert_allclose(
                loaded.predict(full_batch, batch_size=half, verbose=0),
                predictions,
                rtol=1e-6,
                atol=1e-6,
                err_msg="the loaded model predicts differently",
            )
            layer.reset_state()
            _expect_state(layer, initial, f"after reset_state() ({what})")

        # 3. fit must not update a frozen or non-trainable layer.
        model, layer = _probe(fresh(), arrays, multi)
        layer.freeze_state()
        _fit(model, full_batch, half, jit_compile_modes[0], learning_rate=0.0)
        _expect_state(layer, initial, "after fit with the state frozen")
        model, layer = _probe(fresh(), arrays, multi)
        layer.trainable = False
        _fit(model, full_batch, half, jit_compile_modes[0], learning_rate=0.0)
        _expect_state(layer, initial, "after fit with trainable=False")

        # 4. A real optimizer step leaves the state to the layer's own rule.
        model, layer = _probe(fresh(), arrays, multi)
        trainable_ids = {id(v) for v in model.trainable_variables}
        for variable in layer.state_variables:
            _expect(
                not variable.trainable and id(variable) not in trainable_ids,
                f"state '{variable.path}' is trainable: the optimizer would update it.",
            )
        first = steps[0] if multi else steps[0][0]
        _fit(model, first, half, jit_compile_modes[0], learning_rate=0.5)
        _expect_state(layer, after_one, "after an SGD step (lr=0.5)", rtol, atol)

    # 6. Mixed precision: float32 state that does update.
    dtypes = {v.name: v.dtype for v in reference.state_variables}
    for policy in mixed_precision_policies:
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            model, layer = _probe(fresh(), arrays, multi)
            _fit(model, full_batch, half, jit_compile_modes[0], learning_rate=0.0)
        finally:
            keras.config.set_dtype_policy(previous)
        for variable in layer.state_variables:
            _expect(
                variable.dtype == dtypes[variable.name],
                f"under {policy}, state '{variable.path}' has dtype "
                f"{variable.dtype}, expected {dtypes[variable.name]}.",
            )
        state = _snapshot(layer)
        _expect(
            all(np.all(np.isfinite(v)) for v in state.values()),
            f"under {policy}, the state is not finite: {state}",
        )
        _expect(not _same(state, initial), f"under {policy}, fit did not update.")
        _expect_close(
            state,
            after_two,
            f"the state under {policy}",
            mixed_precision_tolerance,
            mixed_precision_tolerance,
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


def _snapshot(layer: StatefulLayer) -> Snapshot:
    return {v.name: np.array(ops.convert_to_numpy(v)) for v in layer.state_variables}


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
    actual = _snapshot(layer)
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
