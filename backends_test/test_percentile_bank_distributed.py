"""PercentileNormalization and MemoryBank data-parallel end with the one-device state.

The model of `backends_test/percentile_bank_worker.py` trains for 3 steps on the
same global batches, once on one device and once data-parallel (JAX DataParallel
on 4 CPU devices, TF MirroredStrategy on 2, torch DDP with batches of 9 and 7);
every replica's state and weights must equal the one-device run within 1e-5.
"""

import numpy as np
import pytest

from backends_test import launch
from backends_test.helpers import BACKEND

WORKER = "percentile_bank_worker"


def run_worker(mode, out):
    return launch.run_worker(WORKER, mode, out)


def assert_same_state(reference, replica, label):
    # The run did update: three steps, three draws, a range away from zero.
    assert int(reference["norm/counter"]) == 3
    np.testing.assert_array_equal(reference["bank/sampler_seed"], [3, 3])
    assert float(reference["norm/hi"]) > float(reference["norm/lo"]) != 0.0
    paths = {path.split("@")[0] for path in replica}
    assert paths == reference.keys(), f"{label}: {paths ^ reference.keys()}"
    for path, value in replica.items():
        expected = reference[path.split("@")[0]]
        np.testing.assert_allclose(
            value, expected, rtol=1e-5, atol=1e-6, err_msg=f"{label}: {path}"
        )


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on JAX")
def test_jax_data_parallel_on_four_devices_matches_one_device(tmp_path):
    parallel = run_worker("jax-data-parallel", tmp_path / "parallel.npz")
    single = launch.reference(tmp_path / "parallel.npz")
    assert_same_state(single, parallel, "DataParallel(4 CPU devices)")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute on TensorFlow")
def test_tf_mirrored_strategy_replicas_match_one_device(tmp_path):
    mirrored = run_worker("tf-mirrored", tmp_path / "mirrored.npz")
    single = launch.reference(tmp_path / "mirrored.npz")
    replicas = {path.split("@")[1] for path in mirrored if "@" in path}
    assert replicas == {"0", "1"}, "each replica's copy must be checked"
    assert_same_state(single, mirrored, "MirroredStrategy(2 CPU devices)")


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed on PyTorch")
def test_torch_ddp_ranks_with_uneven_batches_match_one_process(tmp_path):
    ranks = launch.run_torch_ranks(WORKER, "torch-ddp", tmp_path)
    single = launch.reference(tmp_path / "rank0.npz")
    for rank, replica in enumerate(ranks):
        assert_same_state(single, replica, f"DDP rank {rank} (batches of 9 and 7)")
