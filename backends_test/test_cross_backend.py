"""The same training leaves the same state on every backend.

Each backend's run is compared with one NumPy float64 re-implementation of
the whole training (Dense forward, MSE, SGD, MovingAverage after the Dense).
Every backend within 5e-6 of it means any two backends within 1e-5. The same
NumPy reference checks a hand-written training loop per backend.
"""

import keras
import numpy as np
from keras import ops

from backends_test.helpers import BACKEND, value_of
from keras_stateful.layers import MovingAverage

MOMENTUM = 0.8
LEARNING_RATE = 0.1
STEPS = 5
BATCH = 4


def data():
    rng = np.random.default_rng(42)
    x = rng.normal(size=(STEPS * BATCH, 3)).astype("float32")
    y = rng.normal(size=(STEPS * BATCH, 2)).astype("float32")
    kernel = rng.normal(size=(3, 2)).astype("float32")
    bias = rng.normal(size=(2,)).astype("float32")
    return x, y, kernel, bias


def numpy_training():
    """Dense -> MovingAverage(0.8, zero_debias) -> MSE, plain SGD, in float64."""
    x, y, kernel, bias = (a.astype("float64") for a in data())
    hidden = np.zeros(2)
    average = np.zeros(2)
    for step in range(STEPS):
        xb, yb = (
            x[step * BATCH : (step + 1) * BATCH],
            y[step * BATCH : (step + 1) * BATCH],
        )
        out = xb @ kernel + bias
        hidden = MOMENTUM * hidden + (1 - MOMENTUM) * out.mean(0)
        average = hidden / (1 - MOMENTUM ** (step + 1))
        grad_out = 2 * (out - yb) / out.size
        kernel = kernel - LEARNING_RATE * xb.T @ grad_out
        bias = bias - LEARNING_RATE * grad_out.sum(0)
    return average, kernel


def keras_model():
    _, _, kernel, bias = data()
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(2, name="dense")
    outputs = MovingAverage(MOMENTUM, zero_debias=True, name="ema")(dense(inputs))
    model = keras.Model(inputs, outputs)
    dense.set_weights([kernel, bias])
    return model


def test_fit_matches_numpy_training():
    x, y, _, _ = data()
    model = keras_model()
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse")
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    average, kernel = numpy_training()
    np.testing.assert_allclose(
        value_of(model.get_layer("ema").average), average, atol=5e-6
    )
    np.testing.assert_allclose(
        value_of(model.get_layer("dense").kernel), kernel, atol=5e-6
    )


def test_custom_training_loop_matches_numpy_training():
    x, y, _, _ = data()
    model = keras_model()
    batches = [
        (x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH])
        for i in range(STEPS)
    ]
    {"jax": jax_loop, "tensorflow": tf_loop, "torch": torch_loop}[BACKEND](
        model, batches
    )
    average, kernel = numpy_training()
    np.testing.assert_allclose(
        value_of(model.get_layer("ema").average), average, atol=5e-6
    )
    np.testing.assert_allclose(
        value_of(model.get_layer("dense").kernel), kernel, atol=5e-6
    )


def mse(out, target):
    return ops.mean(ops.square(out - target))


def jax_loop(model, batches):
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss_fn(trainable, non_trainable, xb, yb):
        out, non_trainable = model.stateless_call(
            trainable, non_trainable, xb, training=True
        )
        return mse(out, yb), non_trainable

    @jax.jit
    def step(trainable, non_trainable, xb, yb):
        grads, non_trainable = jax.grad(loss_fn, has_aux=True)(
            trainable, non_trainable, xb, yb
        )
        trainable = [
            w - LEARNING_RATE * g for w, g in zip(trainable, grads, strict=True)
        ]
        return trainable, non_trainable

    for xb, yb in batches:
        trainable, non_trainable = step(trainable, non_trainable, xb, yb)
    for variable, value in zip(model.trainable_variables, trainable, strict=True):
        variable.assign(value)
    for variable, value in zip(
        model.non_trainable_variables, non_trainable, strict=True
    ):
        variable.assign(value)


def tf_loop(model, batches):
    import tensorflow as tf

    optimizer = keras.optimizers.SGD(LEARNING_RATE)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = mse(model(xb, training=True), yb)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)

    for xb, yb in batches:
        step(tf.constant(xb), tf.constant(yb))


def torch_loop(model, batches):
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for xb, yb in batches:
        optimizer.zero_grad()
        loss = mse(model(torch.tensor(xb), training=True), torch.tensor(yb))
        loss.backward()
        optimizer.step()
