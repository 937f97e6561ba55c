"""Write this version's saved-model fixtures on the current Keras backend.

Run it once per backend when the saved format of a layer changes or a new
version is released, and commit what it writes:

    KERAS_BACKEND=jax PYTHONPATH=. python scripts/make_fixtures.py
    KERAS_BACKEND=tensorflow PYTHONPATH=. python scripts/make_fixtures.py
    KERAS_BACKEND=torch PYTHONPATH=. python scripts/make_fixtures.py

For each stateful layer it trains the small `Dense -> layer -> head` model of
`backends_test/all_layers.py` for a few steps on fixed data and writes, under
`backends_test/fixtures/<version>/<backend>/`:

- `<layer>.keras`: the model, its state and its optimizer;
- `<layer>.npz`: what a later load must find: every weight by variable path
  (`weights/<path>`, state included), the optimizer's variables
  (`optimizer/<path>`), predictions on fixed probe inputs, the state after
  one more eager training call on the probe (`after_step/<path>`), and the
  versions that wrote it (`metadata`, a JSON string).

`backends_test/test_saved_models.py` loads every fixture of every version and
backend, so each backend's test session checks the loads from all three.
Fixtures of earlier versions are never rewritten: they are the compatibility
set that later versions must keep loading.
"""

from __future__ import annotations

import json
import pathlib
import platform
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_stateful  # noqa: E402
from backends_test import all_layers  # noqa: E402

FIXTURES = ROOT / "backends_test" / "fixtures"
TRAIN_STEPS = 3
LEARNING_RATE = 0.05


def probe_inputs() -> list[np.ndarray]:
    """Fixed inputs, apart from the training data, for predictions."""
    return all_layers.data(1, seed=1)


def framework_version(backend: str) -> str:
    module = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}[backend]
    return __import__(module).__version__


def write(name: str, out: pathlib.Path) -> None:
    keras.utils.clear_session()
    keras.utils.set_random_seed(0)
    model = all_layers.one_layer_model(name)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse")
    x = all_layers.data(TRAIN_STEPS, seed=0)
    model.fit(
        x,
        all_layers.targets(len(x[0])),
        batch_size=all_layers.BATCH,
        shuffle=False,
        verbose=0,
    )
    model.save(out / f"{name}.keras")

    # The weights as saved, before `predict` adds to the logged values.
    arrays = {}
    for path, value in all_layers.values(model.weights).items():
        arrays[f"weights/{path}"] = value
    for path, value in all_layers.values(model.optimizer.variables).items():
        arrays[f"optimizer/{path}"] = value
    probe = probe_inputs()
    arrays["probe_x"], arrays["probe_labels"] = probe
    arrays["predictions"] = model.predict(probe, batch_size=all_layers.BATCH, verbose=0)
    model(probe, training=True)
    for layer in all_layers.stateful_layers(model):
        for path, value in all_layers.values(layer.state_variables).items():
            arrays[f"after_step/{path}"] = value
    backend = keras.backend.backend()
    arrays["metadata"] = np.array(
        json.dumps(
            {
                "keras_stateful": keras_stateful.__version__,
                "keras": keras.__version__,
                "backend": backend,
                backend: framework_version(backend),
                "numpy": np.__version__,
                "python": platform.python_version(),
                "layer": name,
                "train_steps": TRAIN_STEPS,
            },
            sort_keys=True,
        )
    )
    np.savez_compressed(out / f"{name}.npz", **arrays)


def main() -> None:
    backend = keras.backend.backend()
    out = FIXTURES / keras_stateful.__version__ / backend
    out.mkdir(parents=True, exist_ok=True)
    for name in [*all_layers.LAYERS, *all_layers.VARIANTS]:
        write(name, out)
        print(f"wrote {out.relative_to(ROOT)}/{name}.keras and .npz")


if __name__ == "__main__":
    main()
