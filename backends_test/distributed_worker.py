"""Train a model holding every stateful layer, on one device or data-parallel.

Run as a script by `test_distributed.py` (each engine needs its own process):

    python -m backends_test.distributed_worker single OUT.npz
    python -m backends_test.distributed_worker jax-data-parallel OUT.npz  # 4 devices
    python -m backends_test.distributed_worker tf-mirrored OUT.npz  # 2 CPU devices
    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \
        python -m backends_test.distributed_worker torch-ddp OUT.npz  # one per rank

It writes the state variables of every stateful layer (by path) to OUT.npz,
and the logged values (`logged/center_loss`, `logged/val_center_loss`, ...):
the epoch means of `fit`'s History, or, in the PyTorch loops, the means read
with `keras_stateful.read_logged_values` after training and after a
validation pass. The same global batches are used everywhere; the
data-parallel runs must end with the state and the logged values of the
single-device run.
"""

from __future__ import annotations

import os

from backends_test.worker_process import finish, prepare

MODE = prepare(__name__)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_stateful  # noqa: E402
from keras_stateful import layers  # noqa: E402

GLOBAL_BATCH = 16
STEPS = 3
FEATURES = 6
CLASSES = 4


class AddQueue(keras.layers.Layer):
    """Score per sample, plus the (zero-weighted) queue so that it is used."""

    def call(self, scores, queue):
        return scores + 0.0 * ops.mean(queue)


def data():
    rng = np.random.default_rng(7)
    n = GLOBAL_BATCH * STEPS
    x = rng.normal(2.0, 3.0, (n, FEATURES)).astype("float32")
    # Uneven classes: class 0 is frequent, class 3 rare.
    y = rng.choice(CLASSES, size=n, p=[0.5, 0.25, 0.15, 0.1]).astype("int32")
    target = rng.normal(size=(n, 1)).astype("float32")
    return x, y, target


#: Micro-batches per state update (`ACCUMULATE=2` in the environment): every
#: stateful layer accumulates its statistics over that many batches.
ACCUMULATE = int(os.environ.get("ACCUMULATE", "1"))


def build_model():
    model = build_layers()
    keras_stateful.set_accumulation_steps(model, ACCUMULATE)
    return model


def build_layers():
    seed = keras.initializers.RandomNormal(seed=1)
    features = keras.Input((FEATURES,), name="features")
    labels = keras.Input((), dtype="int32", name="labels")
    h = layers.RunningStandardization(name="standardize")(features)
    h = keras.layers.Dense(FEATURES, kernel_initializer=seed, name="dense")(h)
    h = layers.MovingMoments(momentum=0.9, name="moments")(h)
    h = layers.MovingAverage(0.9, name="average")(h)
    h = layers.FakeQuant(num_bits=8, name="quant")(h)
    h = layers.CenterLoss(
        CLASSES, loss_weight=0.1, centers_initializer=seed, name="centers"
    )([h, labels])
    h = layers.VectorQuantizerEMA(
        8, FEATURES, embeddings_initializer=seed, name="codebook"
    )(h)
    queue = layers.MemoryQueue(10, name="queue")(h)
    scores = keras.layers.Dense(1, kernel_initializer=seed, name="head")(h)
    return keras.Model([features, labels], AddQueue()(scores, queue))


def states(model):
    """Every state variable by path; on TF, each replica's copy as `path@i`."""
    result = {}
    for layer in keras_stateful.find_stateful_layers(model):
        for variable in layer.state_variables:
            copies = getattr(variable.value, "values", None)
            if isinstance(copies, tuple):  # a tf.distribute mirrored variable
                for i, copy in enumerate(copies):
                    result[f"{variable.path}@{i}"] = np.array(copy.numpy())
            else:
                result[variable.path] = np.array(ops.convert_to_numpy(variable))
    return result


def validation_data():
    """Two global batches of their own, for the logged validation values."""
    rng = np.random.default_rng(11)
    n = GLOBAL_BATCH * 2
    x = rng.normal(2.0, 3.0, (n, FEATURES)).astype("float32")
    y = rng.choice(CLASSES, size=n).astype("int32")
    return x, y, rng.normal(size=(n, 1)).astype("float32")


def logged(history):
    """The logged values of a one-epoch History, as `logged/<name>`."""
    ours = ("centers", "codebook", "val_centers", "val_codebook")
    return {
        f"logged/{k}": np.array(v[-1]) for k, v in history.items() if k.startswith(ours)
    }


def fit(model):
    x, y, target = data()
    vx, vy, vtarget = validation_data()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    history = model.fit(
        [x, y],
        target,
        batch_size=GLOBAL_BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        validation_data=([vx, vy], vtarget),
        callbacks=[keras_stateful.LogLayerValues()],
    ).history
    return {**states(model), **logged(history)}


def torch_logged(model, validation_rows):
    """Training means so far, then the means of a validation pass (torch loops).

    Every process calls `read_logged_values` (it sums over processes).
    """
    import torch

    training = keras_stateful.read_logged_values(model)
    for layer in keras_stateful.find_stateful_layers(model):
        layer.reset_logged_values()
    vx, vy, _ = validation_data()
    with keras_stateful.evaluation_logging(all_replicas=True):
        for rows in validation_rows:
            model([torch.tensor(vx[rows]), torch.tensor(vy[rows])], training=False)
    validation = keras_stateful.read_logged_values(model)
    return {
        **{f"logged/{k}": np.array(v) for k, v in training.items()},
        **{f"logged/val_{k}": np.array(v) for k, v in validation.items()},
    }


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
        model = build_model()
        result = fit(model)
    return result


def run_torch_ddp():
    """A DDP training loop (Keras's guide) with uneven per-rank batches."""
    import datetime

    import torch
    import torch.distributed as dist

    # A bounded timeout turns a lost peer into an error instead of a hang.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    keras.utils.set_random_seed(0)
    model = build_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y, target = data()
    # Rank 0 takes 9 samples of each global batch of 16, rank 1 the other 7.
    split = [9, GLOBAL_BATCH - 9] if world == 2 else [GLOBAL_BATCH]
    start = sum(split[:rank])
    for step in range(STEPS):
        rows = slice(
            step * GLOBAL_BATCH + start, step * GLOBAL_BATCH + start + split[rank]
        )
        inputs = [torch.tensor(x[rows]), torch.tensor(y[rows])]
        optimizer.zero_grad()
        outputs = ddp(inputs, training=True)
        # Local sums scaled so that DDP's mean over ranks is the global mean.
        share = split[rank] / GLOBAL_BATCH * world
        loss = torch.mean((outputs - torch.tensor(target[rows])) ** 2) * share
        loss = loss + sum(model.losses) * share
        loss.backward()
        optimizer.step()
    result = states(model)
    result.update(
        torch_logged(
            model,
            [
                slice(b * GLOBAL_BATCH + start, b * GLOBAL_BATCH + start + split[rank])
                for b in range(2)
            ],
        )
    )
    # Free DDP while both ranks are here: its reducer, freed after the other
    # rank has left, can block this one's exit.
    del ddp
    dist.barrier()
    if rank == 0:
        # Inference never communicates: rank 0 predicts alone, while rank 1
        # leaves. A collective here would wait for rank 1 until the timeout.
        rows = slice(0, 5)
        model([torch.tensor(x[rows]), torch.tensor(y[rows])], training=False)
    dist.destroy_process_group()
    return result


def run_torch_single():
    """The same loop as `run_torch_ddp`, on one process and whole batches."""
    import torch

    keras.utils.set_random_seed(0)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y, target = data()
    for step in range(STEPS):
        rows = slice(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        optimizer.zero_grad()
        outputs = model([torch.tensor(x[rows]), torch.tensor(y[rows])], training=True)
        loss = torch.mean((outputs - torch.tensor(target[rows])) ** 2)
        loss = loss + sum(model.losses)
        loss.backward()
        optimizer.step()
    batches = [slice(b * GLOBAL_BATCH, (b + 1) * GLOBAL_BATCH) for b in range(2)]
    return {**states(model), **torch_logged(model, batches)}


RUNS = {
    "single": run_single,
    "jax-data-parallel": run_jax_data_parallel,
    "tf-mirrored": run_tf_mirrored,
    "torch-ddp": run_torch_ddp,
    "torch-single": run_torch_single,
}

if __name__ == "__main__":
    finish(RUNS)
