"""Train CenterLoss, VectorQuantizerEMA and MemoryQueue with their state sharded.

Run as a script by `test_model_parallel.py` (4 virtual CPU devices need a
fresh JAX process):

    python -m backends_test.model_parallel_worker single OUT.npz
    python -m backends_test.model_parallel_worker model-parallel OUT.npz

`model-parallel` runs `single` first (on one of the 4 devices; its results
go to `OUT.reference.npz`, as in the data-parallel workers), then the LayoutMap
example of docs/distributed.md (a `(1, 4)` mesh, axes `("batch", "model")`,
the state split along its first axis over "model") and the same `fit` again.
OUT.npz holds every
state variable by path; in `model-parallel` also, per sharded variable, the
shapes of the shards each device holds (`shards/<path>`), and every collective
of the compiled training step with its shapes (`collectives`, one line each),
read from the optimized HLO that XLA dumps after SPMD partitioning.

With `CHUNKED_SEARCH=1` the codebook is searched in chunks of 8 codes (the
path a large `N x K` takes).

    python -m backends_test.model_parallel_worker tf-model-parallel OUT.npz
    python -m backends_test.model_parallel_worker torch-model-parallel OUT.npz

run `single` and then the same example on TensorFlow (2 logical CPUs) and
PyTorch, to show what Keras does there (OUT.npz: the state, `devices/<path>`
and, on PyTorch, `error`). `single` runs on the backend of `KERAS_BACKEND`.

    python -m backends_test.model_parallel_worker timing OUT.json

times a training step at K = 1,000 and K = 1,000,000 (D = 64) on 4 devices.
"""

from __future__ import annotations

import glob
import os
import pathlib
import re
import shutil
import sys
import tempfile

MODE = sys.argv[1] if __name__ == "__main__" else "imported"
DUMP = tempfile.mkdtemp(prefix="hlo_dump_")
if MODE in ("model-parallel", "timing"):
    os.environ["KERAS_BACKEND"] = "jax"
    # A program found in a persistent compilation cache is not compiled, so
    # XLA would dump no module to read the collectives from.
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4" + (
        f" --xla_dump_to={DUMP} --xla_dump_hlo_module_re=.*train_step.*"
        if MODE == "model-parallel"
        else ""
    )
elif MODE == "tf-model-parallel":
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf

    # Before anything runs: logical devices are fixed once TensorFlow starts.
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )
elif MODE == "torch-model-parallel":
    os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_stateful  # noqa: E402
from backends_test import worker_process  # noqa: E402
from keras_stateful import layers  # noqa: E402
from keras_stateful.layers import vector_quantizer_ema  # noqa: E402

if os.environ.get("CHUNKED_SEARCH") == "1":
    # The codebook searched in chunks of at most 10 codes, as a huge N x K
    # would be (96 codes: 12 interleaved chunks of 8).
    vector_quantizer_ema._SEARCH_ELEMENTS = 12 * 10
    vector_quantizer_ema._MIN_CODES_PER_CHUNK = 8

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Sizes chosen so that no other dimension equals K or K / 4 of any state.
BATCH, STEPS, FEATURES = 12, 4, 6
CLASSES, CODES, QUEUE = 64, 96, 80
SHARDED = (
    "centers",
    "embeddings",
    "ema_cluster_size",
    "ema_cluster_size_hidden",
    "ema_dw",
    "ema_dw_hidden",
    "queue",
)
COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-broadcast",
)
COLLECTIVE = re.compile(rf"\b({'|'.join(COLLECTIVES)})(-start)?\(")


class AddQueue(keras.layers.Layer):
    """Scores, plus the (zero-weighted) queue so that it is used.

    With `first_row=True` only the queue's first row is read, so that the
    step does no work of the queue's size beyond the layers' own.
    """

    def __init__(self, first_row=False, **kwargs):
        super().__init__(**kwargs)
        self.first_row = first_row

    def call(self, scores, queue):
        return scores + 0.0 * ops.mean(queue[:1] if self.first_row else queue)


def build_model(
    classes=CLASSES, codes=CODES, queue_size=QUEUE, dim=FEATURES, first_row=False
):
    seed = keras.initializers.RandomNormal(seed=1)
    features = keras.Input((dim,), name="features")
    labels = keras.Input((), dtype="int32", name="labels")
    h = keras.layers.Dense(dim, kernel_initializer=seed, name="dense")(features)
    h = layers.CenterLoss(
        classes, loss_weight=0.1, centers_initializer=seed, name="centers"
    )([h, labels])
    h = layers.VectorQuantizerEMA(
        codes, dim, embeddings_initializer=seed, name="codebook"
    )(h)
    queue = layers.MemoryQueue(queue_size, name="queue")(h)
    scores = keras.layers.Dense(1, kernel_initializer=seed, name="head")(h)
    return keras.Model([features, labels], AddQueue(first_row)(scores, queue))


def data(classes=CLASSES, dim=FEATURES, batch=BATCH, steps=STEPS):
    rng = np.random.default_rng(7)
    n = batch * steps
    x = rng.normal(2.0, 3.0, (n, dim)).astype("float32")
    y = rng.integers(0, classes, size=n).astype("int32")
    return x, y, rng.normal(size=(n, 1)).astype("float32")


def fit(model):
    x, y, target = data()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit([x, y], target, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)


def states(model):
    result = {}
    for layer in keras_stateful.find_stateful_layers(model):
        for variable in layer.state_variables:
            result[variable.path] = np.array(ops.convert_to_numpy(variable))
    return result


def docs_layout_example():
    """Runs docs/distributed.md's LayoutMap example (the block that uses it)."""
    guide = (ROOT / "docs" / "distributed.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    (example,) = [b for b in blocks if "LayoutMap(" in b]
    namespace: dict = {}
    exec(compile(example, "docs/distributed.md", "exec"), namespace)
    return namespace


def shard_shapes(model):
    """{path: the shapes of the shards on the 4 devices} of the sharded state."""
    result = {}
    for layer in keras_stateful.find_stateful_layers(model):
        for variable in layer.state_variables:
            if variable.path.split("/")[-1] in SHARDED:
                shards = variable.value.addressable_shards
                shapes = [tuple(s.data.shape) for s in shards]
                result[f"shards/{variable.path}"] = np.array(shapes)
                devices = {s.device for s in shards}
                assert len(devices) == 4, (variable.path, devices)
    return result


def collectives_in_train_step():
    """Every collective of the compiled training step, one line of HLO each.

    XLA dumps each module it compiles; the `*after_optimizations.txt` file of
    the module of `jit(train_step)` is the per-device program after SPMD
    partitioning, where any communication is an explicit collective
    instruction that prints its result and operand shapes.
    """
    paths = glob.glob(f"{DUMP}/*train_step*after_optimizations.txt")
    assert paths, f"no train_step module in {os.listdir(DUMP)[:20]}"
    lines = []
    for path in paths:
        for line in pathlib.Path(path).read_text().splitlines():
            if " = " in line and COLLECTIVE.search(line.split("metadata=")[0]):
                lines.append(line.strip())
    return {"collectives": np.array([*lines, ""]), "modules": np.array(paths)}


def run_single():
    keras.utils.set_random_seed(0)
    model = build_model()
    fit(model)
    return states(model)


def run_model_parallel():
    shutil.rmtree(DUMP)  # the one-device run's modules
    os.mkdir(DUMP)
    docs_layout_example()
    keras.utils.set_random_seed(0)
    model = build_model()
    fit(model)
    return {**states(model), **shard_shapes(model), **collectives_in_train_step()}


def placement(model):
    """{`devices/<path>`: the devices holding it} of the would-be sharded state."""
    result = {}
    for layer in keras_stateful.find_stateful_layers(model):
        for variable in layer.state_variables:
            if variable.path.split("/")[-1] in SHARDED:
                device = str(getattr(variable.value, "device", "?"))
                result[f"devices/{variable.path}"] = np.array([device])
    return result


def run_tf_model_parallel():
    """The docs' LayoutMap on TensorFlow with 2 logical CPUs, then `fit`."""
    namespace = docs_layout_example()
    assert namespace["mesh"].shape == (1, 2), namespace["mesh"]
    keras.utils.set_random_seed(0)
    model = build_model()
    fit(model)
    return {**states(model), **placement(model)}


def run_torch_model_parallel():
    """The docs' LayoutMap on PyTorch: what Keras does, then `fit` as usual."""
    try:
        docs_layout_example()
        error = ""
    except Exception as caught:  # recorded for the test to show
        error = f"{type(caught).__name__}: {caught}"
    keras.utils.set_random_seed(0)
    model = build_model()
    fit(model)
    return {**states(model), **placement(model), "error": np.array([error])}


def run_timing(out):
    """Median step at K = 1,000 and 1,000,000 classes and queue rows, D = 64.

    The codebook keeps 256 codes: its nearest-code search is (N, K) work that
    the rule needs, so it is not part of this comparison.
    """
    import json
    import statistics
    import time

    docs_layout_example()
    dim, batch, times = 64, 256, {}
    for k in (1_000, 1_000_000):
        keras.utils.set_random_seed(0)
        model = build_model(classes=k, codes=256, queue_size=k, dim=dim, first_row=True)
        x, y, target = data(classes=k, dim=dim, batch=batch, steps=1)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        for _ in range(2):  # compile
            model.train_on_batch([x, y], target)
        steps = []
        for _ in range(10):
            start = time.perf_counter()
            model.train_on_batch([x, y], target)
            steps.append(time.perf_counter() - start)
        times[k] = statistics.median(steps)
        print(f"K={k}: median step {1e3 * times[k]:.1f} ms", flush=True)
    ratio = times[1_000_000] / times[1_000]
    print(f"K=1,000,000 / K=1,000: {ratio:.1f}x", flush=True)
    pathlib.Path(out).write_text(json.dumps({"times_s": times, "ratio": ratio}))


if __name__ == "__main__":
    if MODE == "timing":
        run_timing(sys.argv[2])
    else:
        worker_process.finish(
            {
                "single": run_single,
                "model-parallel": run_model_parallel,
                "tf-model-parallel": run_tf_model_parallel,
                "torch-model-parallel": run_torch_model_parallel,
            }
        )
