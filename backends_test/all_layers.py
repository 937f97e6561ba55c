"""Small models with every stateful layer, shared by the reliability tests.

`scripts/make_fixtures.py` builds the same models to write the saved-model
fixtures, so a change here changes what a new fixture holds (old fixtures
keep their own config, in the `.keras` file).

Only Keras built-ins, keras_stateful layers and `keras_stateful.testing`'s
registered probe layers appear in these models: a saved one loads with
nothing but the library imported.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_stateful.layers import (
    CenterLoss,
    FakeQuant,
    MemoryQueue,
    MovingAverage,
    MovingMoments,
    RunningStandardization,
    VectorQuantizerEMA,
)
from keras_stateful.stateful_layer import StatefulLayer, find_stateful_layers
from keras_stateful.testing.state_contract import ContractScore

FEATURES = 4
CLASSES = 3
BATCH = 8
QUEUE_SIZE = 12
CODES = 6

#: Each stateful layer as the reliability tests use it, by short name.
LAYERS = {
    "center_loss": lambda: CenterLoss(
        CLASSES, alpha=0.5, loss_weight=0.1, name="center_loss"
    ),
    "moving_average": lambda: MovingAverage(0.9, zero_debias=True, name="average"),
    "moving_moments": lambda: MovingMoments(momentum=0.9, name="moments"),
    "running_standardization": lambda: RunningStandardization(name="standardization"),
    "memory_queue": lambda: MemoryQueue(QUEUE_SIZE, name="queue"),
    "fake_quant": lambda: FakeQuant(8, axis=-1, averaging_constant=0.1, name="quant"),
    "vector_quantizer_ema": lambda: VectorQuantizerEMA(
        CODES, FEATURES, decay=0.9, seed=0, name="vq"
    ),
}

#: Further configurations with state of their own, saved as fixtures too.
VARIANTS = {
    "vector_quantizer_ema_restarts": lambda: VectorQuantizerEMA(
        CODES, FEATURES, decay=0.9, seed=0, restart_threshold=0.5, name="vq"
    ),
}

#: The state variable each layer advances by one per training batch.
COUNTERS = {
    "average": "counter",
    "moments": "counter",
    "quant": "observations",
    "vq": "counter",
}


def labelled(name: str) -> bool:
    """Whether the layer is called on `[features, labels]`."""
    return name == "center_loss"


def data(steps: int, seed: int = 0, batch: int = BATCH) -> list[np.ndarray]:
    """`[x, labels]` for `steps` batches: float32 features, int32 class ids."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=(steps * batch, FEATURES)).astype("float32")
    labels = rng.integers(0, CLASSES, size=(steps * batch,)).astype("int32")
    return [x, labels]


def targets(n: int) -> np.ndarray:
    return np.zeros((n, 1), "float32")


def one_layer_model(name: str) -> keras.Model:
    """`Dense -> layer -> head`: per-sample predictions that read the state.

    Every model takes `[x, labels]` (labels unused but by CenterLoss) so
    that one data set serves them all. The queue's output is not
    batch-aligned; `ContractScore` reduces it to a score per sample.
    """
    x = keras.Input((FEATURES,), name="x")
    labels = keras.Input((), dtype="int32", name="labels")
    hidden = keras.layers.Dense(FEATURES, name="dense")(x)
    layer = {**LAYERS, **VARIANTS}[name]()
    if labelled(name):
        out = layer([hidden, labels])
    else:
        out = layer(hidden)
    if name == "memory_queue":
        score = ContractScore(dtype="float32", name="score")(out, [hidden])
        head = keras.layers.Dense(1, name="head")(hidden)
        outputs = keras.layers.Add(name="prediction")([head, score])
    else:
        outputs = keras.layers.Dense(1, name="head")(out)
    return keras.Model([x, labels], outputs, name=f"{name}_model")


def every_layer_model(*, vq_restart_threshold: float | None = None) -> keras.Model:
    """One model holding all seven layers, in series, and a queue on the side."""
    x = keras.Input((FEATURES,), name="x")
    labels = keras.Input((), dtype="int32", name="labels")
    h = keras.layers.Dense(FEATURES, name="dense")(x)
    h = LAYERS["running_standardization"]()(h)
    h = LAYERS["moving_moments"]()(h)
    h = LAYERS["moving_average"]()(h)
    h = LAYERS["fake_quant"]()(h)
    h = LAYERS["center_loss"]()([h, labels])
    vq = VectorQuantizerEMA(
        CODES,
        FEATURES,
        decay=0.9,
        seed=0,
        restart_threshold=vq_restart_threshold,
        name="vq",
    )
    h = vq(h)
    queue = LAYERS["memory_queue"]()(h)
    score = ContractScore(dtype="float32", name="score")(queue, [h])
    head = keras.layers.Dense(1, name="head")(h)
    outputs = keras.layers.Add(name="prediction")([head, score])
    return keras.Model([x, labels], outputs, name="every_layer_model")


def stateful_layers(model: keras.Model) -> list[StatefulLayer]:
    return find_stateful_layers(model)


def values(variables: list[keras.Variable]) -> dict[str, np.ndarray]:
    """Variable values by path, as NumPy arrays (copies)."""
    return {v.path: np.array(ops.convert_to_numpy(v)) for v in variables}


def model_values(model: keras.layers.Layer) -> dict[str, np.ndarray]:
    """Every variable of the model (weights, state, seeds) and of its optimizer.

    Leaves out the logged values' accumulators: like a Keras metric's
    variables they are not saved, so a resumed run starts them anew.
    """
    logged = {id(v) for layer in stateful_layers(model) for v in layer.logged_variables}
    found = values([v for v in model.variables if id(v) not in logged])
    if getattr(model, "optimizer", None) is not None:
        found.update(values(model.optimizer.variables))
    return found


def assert_identical(actual: dict, expected: dict, what: str) -> None:
    """Same paths, and each value bit for bit (dtype and shape included)."""
    only_actual = sorted(set(actual) - set(expected))
    only_expected = sorted(set(expected) - set(actual))
    assert not only_actual and not only_expected, (
        f"{what}: variables differ: only in actual {only_actual}, "
        f"only in expected {only_expected}"
    )
    different = [
        path
        for path in expected
        if actual[path].dtype != expected[path].dtype
        or actual[path].shape != expected[path].shape
        or not np.array_equal(actual[path], expected[path], equal_nan=True)
    ]
    first_values = "; ".join(
        f"{p}: {actual[p].ravel()[:3].tolist()} vs {expected[p].ravel()[:3].tolist()}"
        for p in different
    )
    assert not different, (
        f"{what}: {len(different)} not bit-identical: {different}; "
        f"first values: {first_values}"
    )
