"""Long runs: state stays finite, memory flat, counters right, limits stated.

The 3,000-step run is marked `slow` (`pytest -m "not slow"` leaves it out;
`nox -s tests` runs it). The leak and int32-limit tests are quick.
"""

import gc
import os
import resource

import keras
import numpy as np
import pytest
from keras import ops

from backends_test import all_layers
from backends_test.helpers import BACKEND, value_of
from keras_stateful import StatefulLayer
from keras_stateful.layers import FakeQuant, MovingAverage, MovingMoments
from keras_stateful.layers.vector_quantizer_ema import VectorQuantizerEMA
from keras_stateful.testing import state_snapshot

# 3,000 steps: eager PyTorch runs about 30 ms a step with every layer, so
# this run is the longest test of its session (10,000 steps took 290 s there).
STEPS_PER_EPOCH = 300
EPOCHS = 10
# A leak shows as resident memory that grows with the steps. 5 KiB a step is
# what the 10,000-step run detected (50 MiB). Measured growth after the first
# epoch: 1.8 MiB on JAX, 0.5 MiB on TensorFlow, 0.04 MiB on PyTorch, each
# levelling off.
LEAK_BYTES_PER_STEP = 5 * 1024
INT32_MAX = 2**31 - 1
MiB = 2**20


def resident_bytes():
    """The process's resident set size now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024


class MemoryPerEpoch(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.resident = []

    def on_epoch_end(self, epoch, logs=None):
        gc.collect()
        self.resident.append(resident_bytes())


@pytest.fixture(scope="module")
def long_run():
    """3,000 steps of the model with every layer, and its memory per epoch.

    PyTorch runs on one thread: Keras's torch `segment_sum` (CenterLoss and
    VectorQuantizerEMA use it) calls `repeat_interleave` with a tensor count,
    ~1000x slower with several intra-op threads on a small CPU.
    """
    threads = None
    if BACKEND == "torch":
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        keras.utils.set_random_seed(0)
        model = all_layers.every_layer_model()
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        x = all_layers.data(STEPS_PER_EPOCH)
        memory = MemoryPerEpoch()
        history = model.fit(
            x,
            all_layers.targets(len(x[0])),
            batch_size=all_layers.BATCH,
            epochs=EPOCHS,
            shuffle=False,
            verbose=0,
            callbacks=[memory],
        )
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
    return model, history, memory.resident


@pytest.mark.slow
def test_long_run_keeps_the_state_finite_and_counted(long_run):
    model, history, _ = long_run
    steps = STEPS_PER_EPOCH * EPOCHS
    samples = steps * all_layers.BATCH
    assert np.all(np.isfinite(history.history["loss"]))
    for path, value in all_layers.values(model.variables).items():
        if np.issubdtype(value.dtype, np.floating):
            assert np.all(np.isfinite(value)), path
    for layer in all_layers.stateful_layers(model):
        assert layer.skipped_updates == 0, layer.name
    for name, counter in all_layers.COUNTERS.items():
        assert state_snapshot(model.get_layer(name))[counter] == steps, name
    queue = state_snapshot(model.get_layer("queue"))
    assert queue["pointer"] == samples % all_layers.QUEUE_SIZE
    assert queue["filled"] == all_layers.QUEUE_SIZE
    # float32 counts are exact to 2**24 values per feature.
    standardization = state_snapshot(model.get_layer("standardization"))
    np.testing.assert_array_equal(standardization["count"], samples)


@pytest.mark.slow
def test_long_run_keeps_memory_flat(long_run):
    _, _, resident = long_run
    # After a warm-up epoch (compilation, caches), memory stays flat.
    growth = max(resident[1:]) - resident[1]
    steps_after_warm_up = STEPS_PER_EPOCH * (EPOCHS - 1)
    assert growth < LEAK_BYTES_PER_STEP * steps_after_warm_up, [
        f"{r / MiB:.0f} MiB" for r in resident
    ]


# ---- leaks, quickly -------------------------------------------------------------


class ExpMean(StatefulLayer):
    """A user's layer: returns exp(x) and keeps its batch mean."""

    def build(self, input_shape):
        self.mean = self.add_state("mean", (input_shape[-1],))

    def call(self, inputs, training=None):
        outputs = ops.exp(inputs)  # PyTorch saves exp's output for backward
        self.commit_state((self.mean, ops.mean(outputs, axis=0)), training=training)
        return outputs


@pytest.mark.parametrize("name", [*all_layers.LAYERS, "user_layer_exp"])
def test_training_calls_leave_no_objects_behind(name, rng):
    layer = ExpMean() if name == "user_layer_exp" else all_layers.LAYERS[name]()
    x = rng.normal(size=(all_layers.BATCH, all_layers.FEATURES)).astype("float32")
    labels = rng.integers(0, all_layers.CLASSES, len(x)).astype("int32")
    scale = keras.Variable(1.0)  # a trainable input: autograd records the call

    def step():
        h = ops.convert_to_tensor(x) * scale
        layer([h, labels] if all_layers.labelled(name) else h, training=True)

    for _ in range(10):
        step()
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(60):
        step()
    gc.collect()
    # A reference cycle per call (pytorch/pytorch#115255 through saved-tensor
    # hooks) would leave ~8 objects per call; caches and noise, a handful.
    assert len(gc.get_objects()) - before < 50


# ---- the int32 limit ------------------------------------------------------------

COUNTER_CASES = ["average", "moments", "quant", "vq", "skipped_updates"]


def test_counters_are_int32():
    model = all_layers.every_layer_model()
    for name, counter in all_layers.COUNTERS.items():
        assert getattr(model.get_layer(name), counter).dtype == "int32", name
    for layer in all_layers.stateful_layers(model):
        assert layer._skipped_updates.dtype == "int32", layer.name
    assert model.get_layer("center_loss").out_of_range_labels.dtype == "int32"


@pytest.mark.parametrize("name", COUNTER_CASES)
def test_a_counter_at_the_int32_limit_saturates_and_the_layer_goes_on(name, rng):
    x = rng.normal(1.0, 2.0, size=(8, all_layers.FEATURES)).astype("float32")
    layer = {
        "average": lambda: MovingAverage(0.9, zero_debias=True),
        "moments": lambda: MovingMoments(momentum=None),
        "quant": lambda: FakeQuant(8),
        "vq": lambda: VectorQuantizerEMA(all_layers.CODES, all_layers.FEATURES, seed=0),
        "skipped_updates": lambda: MovingAverage(0.9),
    }[name]()
    layer(x, training=True)
    if name == "skipped_updates":
        counter = layer._skipped_updates
        x = x.copy()
        x[0, 0] = np.nan
    else:
        counter = getattr(layer, all_layers.COUNTERS[name])
    counter.assign(INT32_MAX - 1)
    for _ in range(3):
        outputs = keras.ops.convert_to_numpy(layer(x, training=True))
    assert int(value_of(counter)) == INT32_MAX, "the counter wrapped"
    state = state_snapshot(layer)
    assert all(np.all(np.isfinite(v)) for v in state.values())
    if name == "average":  # m**t == 0: the average is the hidden EMA
        np.testing.assert_allclose(state["average"], state["hidden"], rtol=1e-6)
        assert np.any(state["average"] != 0)
    if name == "quant":  # still quantizing, with a range
        assert not np.array_equal(outputs, x)
    if name in ("average", "moments", "quant", "vq"):
        assert layer.skipped_updates == 0
