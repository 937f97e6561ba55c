"""Train PercentileNormalization and MemoryBank on one device or data-parallel.

Run as a script by `test_percentile_bank_distributed.py` (each engine needs its
own process), in the modes of `distributed_worker.py`:

    python -m backends_test.percentile_bank_worker single OUT.npz
    python -m backends_test.percentile_bank_worker jax-data-parallel OUT.npz
    python -m backends_test.percentile_bank_worker tf-mirrored OUT.npz
    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \
        python -m backends_test.percentile_bank_worker torch-ddp OUT.npz

The percentiles are taken over the global batch (uneven per-rank batches on
PyTorch), the bank rows of every replica's samples are written on every
replica, duplicate ids meet across replicas, and the sampled negatives enter
the loss, so any difference from the one-device run shows in the weights and
the state written to OUT.npz.
"""

from __future__ import annotations

from backends_test.worker_process import finish, leave_process_group, prepare

MODE = prepare(__name__)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from backends_test import distributed_worker as base  # noqa: E402
from keras_stateful import layers  # noqa: E402

GLOBAL_BATCH = base.GLOBAL_BATCH
STEPS = base.STEPS
FEATURES = 6
HORIZON = 5
SAMPLES = GLOBAL_BATCH * STEPS


class Score(keras.layers.Layer):
    """One score per sample from the normalised returns and the bank's rows."""

    def call(self, h, returns, negatives, bank):
        unit = h / ops.sqrt(ops.sum(ops.square(h), axis=-1, keepdims=True) + 1e-6)
        contrast = ops.mean(ops.matmul(unit, ops.transpose(negatives)), axis=-1)
        return (
            ops.mean(returns, axis=-1, keepdims=True)
            + 0.5 * contrast[:, None]
            + 0.1 * ops.mean(bank)
        )


def data():
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 3.0, (SAMPLES, FEATURES)).astype("float32")
    ids = rng.permutation(SAMPLES).astype("int32")  # each sample once
    target = rng.normal(size=(SAMPLES, 1)).astype("float32")
    return x, ids, target


def build_model():
    seed = keras.initializers.RandomNormal(seed=1)
    features = keras.Input((FEATURES,), name="features")
    ids = keras.Input((), dtype="int32", name="ids")
    h = keras.layers.Dense(FEATURES, kernel_initializer=seed, name="dense")(features)
    returns = keras.layers.Dense(HORIZON, kernel_initializer=seed, name="returns")(h)
    returns = layers.PercentileNormalization(0.3, 0.5, debias=True, name="norm")(
        returns
    )
    negatives, _ = layers.MemoryBank(SAMPLES, num_negatives=7, seed=3, name="bank")(
        [h, ids]
    )
    # Ids modulo 5: duplicates within and across replicas' batches.
    shared_ids = keras.layers.Lambda(lambda i: i % 5, name="shared_ids")(ids)
    bank = layers.MemoryBank(5, momentum=0.2, seed=4, name="shared")([h, shared_ids])
    scores = Score(name="score")(h, returns, negatives, bank)
    head = keras.layers.Dense(1, kernel_initializer=seed, name="head")(h)
    return keras.Model([features, ids], keras.layers.Add()([scores, head]))


def weights(model):
    """The trainable weights too: the normalised returns and negatives reach them."""
    return {
        f"weight/{v.path}": np.array(ops.convert_to_numpy(v))
        for v in model.trainable_variables
    }


def fit(model):
    x, ids, target = data()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(
        [x, ids], target, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0
    )
    return {**base.states(model), **weights(model)}


def run_single():
    keras.utils.set_random_seed(0)
    return fit(build_model())


def run_jax_data_parallel():
    import jax

    devices = jax.devices()
    assert len(devices) == 4, devices
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    keras.utils.set_random_seed(0)
    return fit(build_model())


def run_tf_mirrored():
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        return fit(build_model())


def torch_loop(rank, split, model, step_model):
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, ids, target = data()
    start = sum(split[:rank])
    for step in range(STEPS):
        first = step * GLOBAL_BATCH + start
        rows = slice(first, first + split[rank])
        optimizer.zero_grad()
        outputs = step_model(
            [torch.tensor(x[rows]), torch.tensor(ids[rows])], training=True
        )
        # Local sums scaled so that DDP's mean over ranks is the global mean.
        share = split[rank] / GLOBAL_BATCH * len(split)
        loss = torch.mean((outputs - torch.tensor(target[rows])) ** 2) * share
        loss.backward()
        optimizer.step()
    return {**base.states(model), **weights(model)}


def run_torch_ddp():
    """A DDP loop with uneven per-rank batches: 9 and 7 samples of each 16."""
    import datetime

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    keras.utils.set_random_seed(0)
    model = build_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    result = torch_loop(dist.get_rank(), [9, GLOBAL_BATCH - 9], model, ddp)
    del ddp
    leave_process_group()
    return result


def run_torch_single():
    keras.utils.set_random_seed(0)
    model = build_model()
    return torch_loop(0, [GLOBAL_BATCH], model, model)


RUNS = {
    "single": run_single,
    "jax-data-parallel": run_jax_data_parallel,
    "tf-mirrored": run_tf_mirrored,
    "torch-ddp": run_torch_ddp,
    "torch-single": run_torch_single,
}

if __name__ == "__main__":
    finish(RUNS)
