"""Train a tiny regression model with a MovingAverage layer and show its state.

The MovingAverage after the hidden layer tracks the mean activation of each
hidden unit during training; predict() leaves it untouched.

    KERAS_BACKEND=jax python examples/train_tiny.py
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import numpy as np

from keras_stateful.layers import MovingAverage


def main() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(1024, 1))).astype(
        "float32"
    )

    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(4, activation="relu")(inputs)
    hidden = MovingAverage(momentum=0.9, zero_debias=True, name="activation_ema")(
        hidden
    )
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile(optimizer="adam", loss="mse")
    ema = model.get_layer("activation_ema")

    print(f"backend: {keras.backend.backend()}")
    print("moving average before fit:   ", np.round(np.asarray(ema.average), 4))
    model.fit(x, y, batch_size=64, epochs=3, verbose=2)
    after_fit = np.asarray(ema.average).copy()
    print("moving average after fit:    ", np.round(after_fit, 4))
    model.predict(x, verbose=0)
    unchanged = np.array_equal(np.asarray(ema.average), after_fit)
    print("unchanged by predict():       ", unchanged)
    hidden_model = keras.Model(inputs, model.layers[1].output)
    print(
        "mean activation, last weights:",
        np.round(hidden_model.predict(x, verbose=0).mean(0), 4),
    )


if __name__ == "__main__":
    main()
