"""SyncBatchNormalization data-parallel: each engine's replicas see the global batch.

- PyTorch DDP (gloo, 2 ranks, batches of 9 and 7): outputs, input gradients
  of the global loss and moving statistics equal torch's `BatchNorm1d` on
  the concatenated global batch in float64 (what `torch.nn.SyncBatchNorm`
  computes; that layer refuses to run on CPU), within 1e-5.
- TensorFlow MirroredStrategy (2 CPU devices, 9 and 7) and JAX DataParallel
  (4 CPU devices): every replica's result equals the one-device result on
  the concatenated batch.

The runs are subprocesses of `backends_test/sync_bn_worker.py`.
"""

import numpy as np
import pytest

from backends_test import launch
from backends_test import sync_bn_worker as worker
from backends_test.helpers import BACKEND

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
WORKER = "sync_bn_worker"


def run(mode, out):
    return launch.run_worker(WORKER, mode, out)


def run_torch_ranks(tmp_path, world=2):
    """`world` DDP ranks on loopback; each one's results, by rank."""
    return launch.run_torch_ranks(WORKER, "torch-ddp", tmp_path, world=world)


def assert_equal_runs(reference, parallel, label):
    assert {key.split("@")[0] for key in parallel} == reference.keys()
    for key, value in parallel.items():
        np.testing.assert_allclose(
            value, reference[key.split("@")[0]], **TOLERANCE, err_msg=f"{label}: {key}"
        )


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on JAX")
def test_jax_data_parallel_equals_one_device(tmp_path):
    parallel = run("jax-data-parallel", tmp_path / "parallel.npz")
    single = launch.reference(tmp_path / "parallel.npz")
    assert parallel.keys() == single.keys()
    assert_equal_runs(single, parallel, "DataParallel(4 CPU devices)")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute on TensorFlow")
def test_tf_mirrored_replicas_equal_one_device(tmp_path):
    mirrored = run("tf-mirrored", tmp_path / "mirrored.npz")
    single = launch.reference(tmp_path / "mirrored.npz")
    copies = {key.split("@")[1] for key in mirrored if "@" in key}
    assert copies == {"0", "1"}, "each replica's copy must be checked"
    assert_equal_runs(single, mirrored, "MirroredStrategy(2 CPU devices, 9 + 7)")


def torch_reference(gamma, beta):
    """torch's BatchNorm1d on each global batch in float64, in Keras's terms.

    Keras's `momentum` is `1 - torch's`; Keras keeps the biased batch
    variance, torch the unbiased one: the biased one is recovered from
    torch's `running_var` update and `n / (n - 1)`.
    """
    import torch

    p = 1.0 - worker.MOMENTUM
    bn = torch.nn.BatchNorm1d(gamma.shape[0], eps=worker.EPSILON, momentum=p).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.tensor(beta))
    moving_variance = np.ones_like(gamma, dtype="float64")
    values = worker.GLOBAL_BATCH * worker.SHAPE[0]  # per feature
    steps = []
    for x, r in worker.data():
        x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        previous = bn.running_var.clone()
        out = bn(x.permute(0, 2, 1)).permute(0, 2, 1)  # (N, C, L) for torch
        (dx,) = torch.autograd.grad(torch.sum(out * torch.tensor(r).double()), [x])
        unbiased = ((bn.running_var - (1 - p) * previous) / p).numpy()
        biased = unbiased * (values - 1) / values
        moving_variance = worker.MOMENTUM * moving_variance + p * biased
        steps.append((out.detach().numpy(), dx.numpy()))
    return steps, bn.running_mean.numpy(), moving_variance


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed on PyTorch")
def test_torch_ddp_ranks_equal_torch_batch_norm_on_the_global_batch(tmp_path):
    ranks = run_torch_ranks(tmp_path)
    steps, moving_mean, moving_variance = torch_reference(
        ranks[0]["gamma"], ranks[0]["beta"]
    )
    bounds = [0, worker.SPLIT[0], worker.GLOBAL_BATCH]
    for rank, replica in enumerate(ranks):
        rows = slice(bounds[rank], bounds[rank + 1])
        label = f"DDP rank {rank} of 2 (batches of 9 and 7)"
        for step, (out, dx) in enumerate(steps):
            np.testing.assert_allclose(
                replica[f"outputs/{step}"],
                out[rows],
                **TOLERANCE,
                err_msg=f"{label}, step {step}: outputs",
            )
            np.testing.assert_allclose(
                replica[f"input_gradient/{step}"],
                dx[rows],
                **TOLERANCE,
                err_msg=f"{label}, step {step}: input gradient of the global loss",
            )
        np.testing.assert_allclose(
            replica["moving_mean"], moving_mean, **TOLERANCE, err_msg=label
        )
        np.testing.assert_allclose(
            replica["moving_variance"], moving_variance, **TOLERANCE, err_msg=label
        )


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed on PyTorch")
def test_torch_one_process_equals_the_reference_too(tmp_path):
    """Without DDP (no process group) the same numbers: nothing is reduced."""
    single = run("single", tmp_path / "single.npz")
    steps, moving_mean, moving_variance = torch_reference(
        single["gamma"], single["beta"]
    )
    for step, (out, dx) in enumerate(steps):
        np.testing.assert_allclose(single[f"outputs/{step}"], out, **TOLERANCE)
        np.testing.assert_allclose(single[f"input_gradient/{step}"], dx, **TOLERANCE)
    np.testing.assert_allclose(single["moving_mean"], moving_mean, **TOLERANCE)
    np.testing.assert_allclose(single["moving_variance"], moving_variance, **TOLERANCE)
