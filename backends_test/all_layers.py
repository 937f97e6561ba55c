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
    AveragedModel,
    CenterLoss,
    FakeQuant,
    MemoryBank,
    MemoryQueue,
    MovingAverage,
    MovingMoments,
    PercentileNormalization,
    RunningStandardization,
    SpectralNormalization,
    SyncBatchNormalization,
    VectorQuantizerEMA,
)
from keras_stateful.stateful_layer import StatefulLayer, find_stateful_layers
from keras_stateful.testing.state_contract import ContractScore

FEATURES = 4
CLASSES = 3
BATCH = 8
QUEUE_SIZE = 12
CODES = 6
#: MemoryBank's rows: one per class, so that the labels serve as sample ids
#: (a batch repeats ids, which the bank averages) and 3 is out of range.
BANK_SIZE = CLASSES


def seeded_dense(name: str) -> keras.layers.Dense:
    """A built `Dense(FEATURES)` whose initial kernel is the same every time.

    The wrappers' state is read from the wrapped layer's weights, so two
    fresh instances (a model and its eager reference) must start alike.
    Built here, outside the wrapper: a layer the wrapper builds gets the
    wrapper's name in its variables' paths (`averaged/student/kernel`),
    which a loaded model, building it on its own, does not have.
    """
    dense = keras.layers.Dense(
        FEATURES, kernel_initializer=keras.initializers.GlorotUniform(seed=0), name=name
    )
    dense.build((None, FEATURES))
    return dense


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
    "percentile_normalization": lambda: PercentileNormalization(
        rate=0.1, debias=True, name="percentile"
    ),
    "memory_bank": lambda: MemoryBank(BANK_SIZE, momentum=0.5, seed=0, name="bank"),
    "averaged_model": lambda: AveragedModel(
        seeded_dense("student"), decay=0.9, name="averaged"
    ),
    "spectral_normalization": lambda: SpectralNormalization(
        seeded_dense("spectral_dense"), name="spectral"
    ),
    "sync_batch_normalization": lambda: SyncBatchNormalization(
        momentum=0.9, name="sync_bn"
    ),
}

#: The layers whose state is computed from the wrapped layer's weights, not
#: from the values of the inputs: a bad input value is no bad update for them.
STATE_FROM_WEIGHTS = {"averaged_model", "spectral_normalization"}

#: Further configurations with state of their own, saved as fixtures too.
VARIANTS = {
    "vector_quantizer_ema_restarts": lambda: VectorQuantizerEMA(
        CODES, FEATURES, decay=0.9, seed=0, threshold_ema_dead_code=0.5, name="vq"
    ),
}

#: The state variable each layer advances by one per training batch.
COUNTERS = {
    "average": "counter",
    "moments": "counter",
    "quant": "observations",
    "vq": "counter",
    "percentile": "counter",
    "averaged": "step",
}


def labelled(name: str) -> bool:
    """Whether the layer is called on `[features, labels]`.

    MemoryBank takes the labels as its sample ids.
    """
    return name in ("center_loss", "memory_bank")


def wrapped_kernel(layer: keras.layers.Layer) -> keras.Variable:
    """The kernel of the layer a `STATE_FROM_WEIGHTS` wrapper holds."""
    return layer.layer.kernel


def not_batch_aligned(name: str) -> bool:
    """Whether the layer returns its stored rows rather than one per sample."""
    return name in ("memory_queue", "memory_bank")


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

    Every model takes `[x, labels]` (labels unused but by CenterLoss, and
    MemoryBank's sample ids) so that one data set serves them all. The
    queue's and the bank's outputs are not batch-aligned; `ContractScore`
    reduces them to a score per sample. AveragedModel's student is not
    called by the model besides (so not trained): a `.keras` file of
    `Dense -> student` and `Dense -> AveragedModel(student)` side by side
    fails to load ("Layer 'student' expected 2 variables, but received 0";
    not yet root-caused), which `every_layer_model` (student in series)
    does not meet.
    """
    x = keras.Input((FEATURES,), name="x")
    labels = keras.Input((), dtype="int32", name="labels")
    hidden = keras.layers.Dense(FEATURES, name="dense")(x)
    layer = {**LAYERS, **VARIANTS}[name]()
    if labelled(name):
        out = layer([hidden, labels])
    else:
        out = layer(hidden)
    if not_batch_aligned(name):
        score = ContractScore(dtype="float32", name="score")(out, [hidden])
        head = keras.layers.Dense(1, name="head")(hidden)
        outputs = keras.layers.Add(name="prediction")([head, score])
    else:
        outputs = keras.layers.Dense(1, name="head")(out)
    return keras.Model([x, labels], outputs, name=f"{name}_model")


def every_layer_model(*, vq_restart_threshold: float | None = None) -> keras.Model:
    """One model holding every layer: in series, and on the side those whose
    output is not batch-aligned (the queue, the bank) or carries no gradient
    (the average of the student in series)."""
    x = keras.Input((FEATURES,), name="x")
    labels = keras.Input((), dtype="int32", name="labels")
    h = keras.layers.Dense(FEATURES, name="dense")(x)
    h = LAYERS["sync_batch_normalization"]()(h)
    h = LAYERS["percentile_normalization"]()(h)
    averaged = LAYERS["averaged_model"]()
    teacher = averaged(h)
    h = averaged.layer(h)
    h = LAYERS["spectral_normalization"]()(h)
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
        threshold_ema_dead_code=vq_restart_threshold,
        name="vq",
    )
    h = vq(h)
    queue = LAYERS["memory_queue"]()(h)
    bank = LAYERS["memory_bank"]()([h, labels])
    score = ContractScore(dtype="float32", name="score")([queue, bank], [h])
    head = keras.layers.Dense(1, name="head")(h)
    teacher_head = keras.layers.Dense(1, name="teacher_head")(teacher)
    outputs = keras.layers.Add(name="prediction")([head, score, teacher_head])
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
