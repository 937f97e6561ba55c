"""Train a student and its AveragedModel on one device or data-parallel.

Run as a script by `test_averaged_distributed.py` (each engine needs its own
process), like `distributed_worker.py`:

    python -m backends_test.averaged_distributed_worker single OUT.npz
    python -m backends_test.averaged_distributed_worker jax-data-parallel OUT.npz
    python -m backends_test.averaged_distributed_worker tf-mirrored OUT.npz
    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \
        python -m backends_test.averaged_distributed_worker torch-ddp OUT.npz

It writes the wrapper's state (the averaged variables and the counters) by
path, each replica's copy as `path@i` on TensorFlow, to OUT.npz. The weights
are replicated, so every replica averages the same values: no communication,
and every replica must end with the one-device average.
"""

from __future__ import annotations

from backends_test.worker_process import finish, leave_process_group, prepare

MODE = prepare(__name__)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from keras_stateful.layers import AveragedModel  # noqa: E402

GLOBAL_BATCH = 16
STEPS = 4
FEATURES = 6


class WithTeacher(keras.layers.Layer):
    """The student's output, plus the teacher's with weight zero (so it runs)."""

    def call(self, student, teacher):
        return student + 0.0 * ops.mean(teacher)


def data():
    rng = np.random.default_rng(7)
    n = GLOBAL_BATCH * STEPS
    x = rng.normal(1.0, 2.0, (n, FEATURES)).astype("float32")
    return x, rng.normal(size=(n, 1)).astype("float32")


def build_model():
    seed = keras.initializers.RandomNormal(seed=1)
    student = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(8, "relu", kernel_initializer=seed),
            keras.layers.Dense(1, kernel_initializer=seed),
        ],
        name="student",
    )
    teacher = AveragedModel(student, decay=0.5, name="teacher")
    inputs = keras.Input((FEATURES,))
    return keras.Model(inputs, WithTeacher()(student(inputs), teacher(inputs)))


def states(model):
    result = {}
    for variable in model.get_layer("teacher").state_variables:
        copies = getattr(variable.value, "values", None)
        if isinstance(copies, tuple):  # a tf.distribute mirrored variable
            for i, copy in enumerate(copies):
                result[f"{variable.path}@{i}"] = np.array(copy.numpy())
        else:
            result[variable.path] = np.array(ops.convert_to_numpy(variable))
    return result


def fit(model):
    x, target = data()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(x, target, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return states(model)


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


def torch_loop(rank, world):
    """Keras's DDP guide loop; rank 0 takes 9 samples of each batch of 16."""
    import torch

    keras.utils.set_random_seed(0)
    model = build_model()
    forward = model
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, target = data()
    split = [9, GLOBAL_BATCH - 9] if world == 2 else [GLOBAL_BATCH]
    start = sum(split[:rank])
    for step in range(STEPS):
        first = step * GLOBAL_BATCH + start
        rows = slice(first, first + split[rank])
        optimizer.zero_grad()
        outputs = forward(torch.tensor(x[rows]), training=True)
        share = split[rank] / GLOBAL_BATCH * world
        loss = torch.mean((outputs - torch.tensor(target[rows])) ** 2) * share
        loss.backward()
        optimizer.step()
    return states(model)


def run_torch_ddp():
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    result = torch_loop(dist.get_rank(), dist.get_world_size())  # DDP freed
    leave_process_group()
    return result


RUNS = {
    "single": run_single,
    "jax-data-parallel": run_jax_data_parallel,
    "tf-mirrored": run_tf_mirrored,
    "torch-ddp": run_torch_ddp,
    "torch-single": lambda: torch_loop(0, 1),
}

if __name__ == "__main__":
    finish(RUNS)
