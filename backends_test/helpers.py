"""Small helpers shared by the test files (fixtures live in conftest.py)."""

import keras
import numpy as np

BACKEND = keras.backend.backend()


def value_of(variable):
    """A variable's value as a NumPy copy."""
    return np.array(keras.ops.convert_to_numpy(variable))


def jax_copies_of_state(model, inputs, shape):
    """Lines of the compiled JAX training step of `model` that copy a state
    of `shape` (a state written by rows should be written in place: XLA
    copies it when a read of it is not ordered before the write).

    The step is `fit`'s: a `stateless_call` under `jax.value_and_grad`, with
    the variables donated.
    """
    import jax

    trainable = [v.value for v in model.trainable_variables]
    state = [v.value for v in model.non_trainable_variables]

    def step(trainable, state, inputs):
        def loss_of(trainable):
            out, state_now, losses = model.stateless_call(
                trainable, state, inputs, training=True, return_losses=True
            )
            outputs = keras.tree.flatten(out)
            return keras.ops.mean(outputs[0] ** 2) + sum(losses), state_now

        (_, state_now), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        return [w - 0.1 * g for w, g in zip(trainable, grads, strict=True)], state_now

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, state, inputs)
    kind = "f32[" + ",".join(str(n) for n in shape) + "]"
    return [
        line.strip()
        for line in lowered.compile().as_text().splitlines()
        if kind in line and " copy(" in line
    ]
