"""AveragedModel under data parallelism: every replica ends with the one-device average.

The student's weights are replicated, so each replica averages the same values
without communicating. A model with a Dense student and its wrapper trains 4
steps on the same global batches, once on one device and once data-parallel
(JAX DataParallel on 4 CPU devices, TF MirroredStrategy on 2, torch DDP on 2
ranks with batches of 9 and 7), in subprocesses of
`backends_test/averaged_distributed_worker.py`.
"""

import numpy as np
import pytest

from backends_test import launch
from backends_test.helpers import BACKEND

WORKER = "averaged_distributed_worker"


def run_worker(mode, out):
    return launch.run_worker(WORKER, mode, out)


def assert_same_average(reference, replica, label):
    assert replica, f"{label}: no state recorded"
    assert {p.split("@")[0] for p in replica} == set(reference), label
    for path, value in replica.items():
        expected = reference[path.split("@")[0]]
        np.testing.assert_allclose(
            value, expected, rtol=1e-5, atol=1e-6, err_msg=f"{label}: {path}"
        )
    steps = [v for p, v in replica.items() if p.split("@")[0].endswith("/step")]
    assert steps and all(int(s) == 4 for s in steps), f"{label}: {steps}"


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on JAX")
def test_jax_data_parallel_average_matches_one_device(tmp_path):
    parallel = run_worker("jax-data-parallel", tmp_path / "parallel.npz")
    single = launch.reference(tmp_path / "parallel.npz")
    assert_same_average(single, parallel, "DataParallel(4 devices)")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute on TensorFlow")
def test_tf_mirrored_replicas_average_matches_one_device(tmp_path):
    mirrored = run_worker("tf-mirrored", tmp_path / "mirrored.npz")
    single = launch.reference(tmp_path / "mirrored.npz")
    assert {p.split("@")[1] for p in mirrored if "@" in p} == {"0", "1"}
    assert_same_average(single, mirrored, "MirroredStrategy(2 CPU devices)")


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed on PyTorch")
def test_torch_ddp_ranks_average_matches_one_process(tmp_path):
    ranks = launch.run_torch_ranks(WORKER, "torch-ddp", tmp_path)
    single = launch.reference(tmp_path / "rank0.npz")
    for rank, replica in enumerate(ranks):
        assert_same_average(single, replica, f"DDP rank {rank}")
