"""Run SyncBatchNormalization for a few steps, on one device or data-parallel.

Run as a script by `test_sync_batch_normalization_distributed.py` (each
engine needs its own process):

    python -m backends_test.sync_bn_worker single OUT.npz
    python -m backends_test.sync_bn_worker jax-data-parallel OUT.npz  # 4 devices
    python -m backends_test.sync_bn_worker tf-mirrored OUT.npz  # 2 CPU devices
    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \\
        python -m backends_test.sync_bn_worker torch-ddp OUT.npz  # one per rank

Each step takes a global batch of 16 (split 9 + 7 over two replicas, 4 x 4
under JAX), computes the outputs and the input gradient of the global loss
`sum(outputs * weights)`, and writes them (`outputs/<step>`,
`input_gradient/<step>`, the rows of this replica, or all rows), then the
moving statistics (`moving_mean`, `moving_variance`; on TensorFlow each
replica's copy as `moving_mean@<i>`) and `gamma`, `beta`.
"""

from __future__ import annotations

from backends_test.worker_process import finish, prepare

MODE = prepare(__name__)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from keras_stateful.layers import SyncBatchNormalization  # noqa: E402

GLOBAL_BATCH = 16
SPLIT = (9, 7)
STEPS = 3
SHAPE = (2, 3)  # per sample: 2 positions, 3 features
MOMENTUM = 0.8
EPSILON = 1e-3


def data():
    """Per step: the global batch and the weights of the loss."""
    rng = np.random.default_rng(3)
    return [
        (
            rng.normal(2.0, 3.0, (GLOBAL_BATCH, *SHAPE)).astype("float32"),
            rng.normal(size=(GLOBAL_BATCH, *SHAPE)).astype("float32"),
        )
        for _ in range(STEPS)
    ]


def make_layer():
    layer = SyncBatchNormalization(
        momentum=MOMENTUM,
        epsilon=EPSILON,
        gamma_initializer=keras.initializers.RandomNormal(1.0, 0.3, seed=1),
        beta_initializer=keras.initializers.RandomNormal(0.0, 0.3, seed=2),
    )
    layer.build((None, *SHAPE))
    return layer


def weights(layer, result):
    for variable in (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance):
        copies = getattr(variable.value, "values", None)
        if isinstance(copies, tuple):  # a tf.distribute mirrored variable
            for i, copy in enumerate(copies):
                result[f"{variable.name}@{i}"] = np.array(copy.numpy())
        else:
            result[variable.name] = np.array(ops.convert_to_numpy(variable))
    return result


def run_single():
    from backends_test.test_sync_batch_normalization import step_with_gradients

    layer = make_layer()
    result = {}
    for step, (x, r) in enumerate(data()):
        out, dx, _ = step_with_gradients(layer, x, r)
        result[f"outputs/{step}"], result[f"input_gradient/{step}"] = out, dx
    return weights(layer, result)


def run_jax_data_parallel():
    import jax
    import jax.numpy as jnp

    devices = jax.devices()
    assert len(devices) == 4, devices
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    layer = make_layer()
    result = {}
    for step, (x, r) in enumerate(data()):
        layout = distribution.get_data_layout(x.shape)
        x = keras.distribution.distribute_tensor(jnp.asarray(x), layout)
        assert len(x.sharding.device_set) == 4, "the batch must be sharded"
        non_trainable = [v.value for v in layer.non_trainable_variables]
        trainable = [v.value for v in layer.trainable_variables]

        def loss(x, r=r, trainable=trainable, non_trainable=non_trainable):
            out, state = layer.stateless_call(
                trainable, non_trainable, x, training=True
            )
            return jnp.sum(out * r), (out, state)

        (_, (out, state)), dx = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
        for variable, value in zip(layer.non_trainable_variables, state, strict=True):
            variable.assign(value)
        result[f"outputs/{step}"] = np.asarray(out)
        result[f"input_gradient/{step}"] = np.asarray(dx)
    return weights(layer, result)


def run_tf_mirrored():
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        layer = make_layer()

    def replica_step(x, r):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True)
            loss = tf.reduce_sum(out * r)
        return out, tape.gradient(loss, x)

    @tf.function
    def step(x, r):
        return strategy.run(replica_step, args=(x, r))

    result = {}
    bounds = [0, SPLIT[0], GLOBAL_BATCH]
    for step_number, (x, r) in enumerate(data()):

        def rows(context, array):
            i = context.replica_id_in_sync_group
            return tf.constant(array[bounds[i] : bounds[i + 1]])

        xs = strategy.experimental_distribute_values_from_function(
            lambda context, x=x: rows(context, x)
        )
        rs = strategy.experimental_distribute_values_from_function(
            lambda context, r=r: rows(context, r)
        )
        out, dx = step(xs, rs)
        parts = strategy.experimental_local_results
        assert [p.shape[0] for p in parts(out)] == list(SPLIT)
        result[f"outputs/{step_number}"] = np.concatenate(
            [p.numpy() for p in parts(out)]
        )
        result[f"input_gradient/{step_number}"] = np.concatenate(
            [p.numpy() for p in parts(dx)]
        )
    return weights(layer, result)


def run_torch_ddp():
    """Ranks of 9 and 7 samples under DDP; each writes its own rows."""
    import datetime

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    layer = make_layer()
    ddp = torch.nn.parallel.DistributedDataParallel(layer)
    start = sum(SPLIT[:rank])
    rows = slice(start, start + SPLIT[rank])
    result = {}
    for step, (x, r) in enumerate(data()):
        local = torch.tensor(x[rows], requires_grad=True)
        out = ddp(local, training=True)
        # The global loss is the sum of the ranks' losses.
        torch.sum(out * torch.tensor(r[rows])).backward()
        result[f"outputs/{step}"] = out.detach().numpy()
        result[f"input_gradient/{step}"] = local.grad.numpy()
    weights(layer, result)
    # Let DDP go while the group is whole: its reducer, freed after a peer
    # left, can block the process at exit.
    del ddp
    dist.barrier()
    if rank == 0:
        # Inference never communicates: rank 0 predicts alone.
        layer(torch.tensor(data()[0][0][:5]), training=False)
    dist.destroy_process_group()
    return result


RUNS = {
    "single": run_single,
    "jax-data-parallel": run_jax_data_parallel,
    "tf-mirrored": run_tf_mirrored,
    "torch-ddp": run_torch_ddp,
}

if __name__ == "__main__":
    finish(RUNS)
