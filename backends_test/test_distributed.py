"""Data-parallel training on each backend's own engine ends with the one-device state.

A model with every stateful layer trains for 3 steps on the same global batches,
once on one device and once data-parallel; every replica's state must equal the
one-device state within 1e-5. Each engine needs a fresh process (virtual devices
are fixed at start-up), so the runs are subprocesses of
`backends_test/distributed_worker.py`.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from backends_test.conftest import BACKEND

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_worker(mode, out, **env):
    completed = subprocess.run(
        [sys.executable, "-m", "backends_test.distributed_worker", mode, str(out)],
        cwd=ROOT,
        env={
            **os.environ,
            "KERAS_BACKEND": BACKEND,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return dict(np.load(out))


def assert_same_state(reference, replica, label):
    assert replica, f"{label}: no state recorded"
    for path, value in replica.items():
        expected = reference[path.split("@")[0]]
        np.testing.assert_allclose(
            value, expected, rtol=1e-5, atol=1e-6, err_msg=f"{label}: {path}"
        )


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on JAX")
def test_jax_data_parallel_on_four_devices_matches_one_device(tmp_path):
    single = run_worker("single", tmp_path / "single.npz")
    parallel = run_worker("jax-data-parallel", tmp_path / "parallel.npz")
    assert parallel.keys() == single.keys()
    assert_same_state(single, parallel, "DataParallel(4 CPU devices)")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute on TensorFlow")
def test_tf_mirrored_strategy_replicas_match_one_device(tmp_path):
    single = run_worker("single", tmp_path / "single.npz")
    mirrored = run_worker("tf-mirrored", tmp_path / "mirrored.npz")
    replicas = {path.split("@")[1] for path in mirrored}
    assert replicas == {"0", "1"}, "each replica's copy must be checked"
    assert_same_state(single, mirrored, "MirroredStrategy(2 CPU devices)")


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed on PyTorch")
def test_torch_ddp_ranks_with_uneven_batches_match_one_process(tmp_path):
    single = run_worker("torch-single", tmp_path / "single.npz")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backends_test.distributed_worker",
                "torch-ddp",
                str(tmp_path / f"rank{rank}.npz"),
            ],
            cwd=ROOT,
            env={
                **os.environ,
                "KERAS_BACKEND": "torch",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "RANK": str(rank),
                "WORLD_SIZE": "2",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for rank, process in enumerate(ranks):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"rank {rank}: {stderr[-3000:]}"
    for rank in range(2):
        replica = dict(np.load(tmp_path / f"rank{rank}.npz"))
        assert replica.keys() == single.keys()
        assert_same_state(single, replica, f"DDP rank {rank} (batches of 9 and 7)")
