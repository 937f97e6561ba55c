"""AveragedModel under data parallelism: every replica ends with the one-device average.

The student's weights are replicated, so each replica averages the same values
without communicating. A model with a Dense student and its wrapper trains 4
steps on the same global batches, once on one device and once data-parallel
(JAX DataParallel on 4 CPU devices, TF MirroredStrategy on 2, torch DDP on 2
ranks with batches of 9 and 7), in subprocesses of
`backends_test/averaged_distributed_worker.py`.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from backends_test.helpers import BACKEND
from backends_test.test_distributed import wait_for_ranks

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = "backends_test.averaged_distributed_worker"


def run_worker(mode, out):
    completed = subprocess.run(
        [sys.executable, "-m", WORKER, mode, str(out)],
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return dict(np.load(out))


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
    single = run_worker("single", tmp_path / "single.npz")
    parallel = run_worker("jax-data-parallel", tmp_path / "parallel.npz")
    assert_same_average(single, parallel, "DataParallel(4 devices)")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute on TensorFlow")
def test_tf_mirrored_replicas_average_matches_one_device(tmp_path):
    single = run_worker("single", tmp_path / "single.npz")
    mirrored = run_worker("tf-mirrored", tmp_path / "mirrored.npz")
    assert {p.split("@")[1] for p in mirrored if "@" in p} == {"0", "1"}
    assert_same_average(single, mirrored, "MirroredStrategy(2 CPU devices)")


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed on PyTorch")
def test_torch_ddp_ranks_average_matches_one_process(tmp_path):
    single = run_worker("torch-single", tmp_path / "single.npz")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    handles = [log.open("w") for log in logs]
    env = {
        **os.environ,
        "KERAS_BACKEND": "torch",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "GLOO_SOCKET_IFNAME": "lo",
        "WORLD_SIZE": "2",
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", WORKER, "torch-ddp", str(tmp_path / f"r{rank}.npz")],
            cwd=ROOT,
            env={**env, "RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=handles[rank],
        )
        for rank in range(2)
    ]
    try:
        wait_for_ranks(ranks, logs, timeout=240)
    finally:
        for handle in handles:
            handle.close()
    for rank in range(2):
        replica = dict(np.load(tmp_path / f"r{rank}.npz"))
        assert_same_average(single, replica, f"DDP rank {rank}")
