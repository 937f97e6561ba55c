"""Train VectorQuantizerEMA options and ResidualVectorQuantizer, one device or
data-parallel.

Run as a script by `test_vector_quantizer_distributed.py` (each engine needs
its own process), in the modes of `distributed_worker.py`:

    python -m backends_test.vector_quantizer_worker single OUT.npz
    python -m backends_test.vector_quantizer_worker jax-data-parallel OUT.npz
    python -m backends_test.vector_quantizer_worker tf-mirrored OUT.npz
    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \
        python -m backends_test.vector_quantizer_worker torch-ddp OUT.npz

The k-means of `kmeans_init=True` runs over the global batch (gathered from
the replicas, uneven per-rank batches on PyTorch), in a cosine-similarity
quantizer and in every stage of a residual quantizer; the quantized values
reach the weights, so any difference from the one-device run shows in the
weights and the state written to OUT.npz. (Dead-code restarts are left out:
their vectors are, by design, means over the replicas' own draws.)
"""

from __future__ import annotations

from backends_test.worker_process import finish, prepare

MODE = prepare(__name__)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from backends_test import distributed_worker as base  # noqa: E402
from backends_test import percentile_bank_worker as runner  # noqa: E402
from keras_stateful import layers  # noqa: E402

GLOBAL_BATCH = base.GLOBAL_BATCH
STEPS = base.STEPS
FEATURES = 6
SAMPLES = GLOBAL_BATCH * STEPS


def data():
    rng = np.random.default_rng(7)
    centers = 3.0 * rng.normal(size=(5, FEATURES))
    x = centers[rng.integers(0, 5, SAMPLES)] + rng.normal(size=(SAMPLES, FEATURES))
    ids = np.zeros(SAMPLES, "int32")  # the runner's second input, unused
    target = rng.normal(size=(SAMPLES, 1)).astype("float32")
    return x.astype("float32"), ids, target


def build_model():
    seed = keras.initializers.RandomNormal(seed=1)
    features = keras.Input((FEATURES,), name="features")
    ids = keras.Input((), dtype="int32", name="ids")
    h = keras.layers.Dense(FEATURES, kernel_initializer=seed, name="dense")(features)
    cosine = layers.VectorQuantizerEMA(
        4, FEATURES, kmeans_init=True, use_cosine_sim=True, seed=2, name="cosine"
    )(h)
    residual = layers.ResidualVectorQuantizer(
        3, 4, FEATURES, kmeans_init=True, kmeans_iters=5, decay=0.8, seed=3, name="rvq"
    )(h)
    both = keras.layers.Concatenate(name="both")([cosine, residual])
    scores = keras.layers.Dense(1, kernel_initializer=seed, name="head")(both)
    zero = keras.layers.Lambda(lambda i: 0.0 * keras.ops.cast(i, "float32"))(ids)
    return keras.Model([features, ids], scores + zero[:, None])


runner.data = data
runner.build_model = build_model

if __name__ == "__main__":
    finish(runner.RUNS)
