"""Check an installed keras-stateful (a wheel, not this source tree) works.

Run by `python3 -m nox -s package` in a fresh venv holding only the wheel and
one backend extra; any backend works:

    KERAS_BACKEND=jax python scripts/smoke_installed.py

It imports the public names, then trains a small model with a `MovingMoments`
layer for one epoch and checks that `fit` moved the layer's state to the
statistics of the data, and that `predict` leaves it alone. It exits non-zero
(an exception) on any failure.
"""

from __future__ import annotations

import pathlib

import keras
import numpy as np

import keras_stateful
from keras_stateful.layers import MovingMoments

SOURCE_PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_stateful"


def check_installed_copy() -> None:
    """Refuse to pass when the package was imported from this source tree."""
    location = pathlib.Path(keras_stateful.__file__).resolve()
    if location.parent == SOURCE_PACKAGE:
        raise RuntimeError(
            f"keras_stateful was imported from the source tree ({location}), "
            "not from the installed wheel; run this script with the venv's "
            "python from a folder where `keras_stateful/` is not importable."
        )
    print(f"keras_stateful from {location} on Keras {keras.__version__}")


def fit_once() -> None:
    """One epoch of `fit` must set the moving mean; `predict` must not move it."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(256, 3)) * 2.0 + 5.0).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    moments = MovingMoments(momentum=0.0, name="moments")
    model = keras.Sequential([keras.Input((3,)), moments, keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=256, epochs=1, verbose=0)

    mean = keras.ops.convert_to_numpy(moments.moving_mean)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-5)
    model.predict(x + 100.0, verbose=0)
    after = keras.ops.convert_to_numpy(moments.moving_mean)
    np.testing.assert_array_equal(after, mean)
    print(f"fit set the moving mean to {np.round(mean, 3)}; predict left it")


if __name__ == "__main__":
    check_installed_copy()
    fit_once()
