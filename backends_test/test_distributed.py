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
import time

import numpy as np
import pytest

from backends_test import all_layers
from backends_test.helpers import BACKEND
from keras_stateful import distributed

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


LOGGED = {
    f"logged/{prefix}{name}"
    for prefix in ("", "val_")
    for name in (
        "centers",
        "codebook_perplexity",
        "codebook_usage",
        "codebook_commitment_loss",
    )
}


def assert_same_state(reference, replica, label):
    """Every state variable and every logged value (training and validation)."""
    assert replica, f"{label}: no state recorded"
    assert LOGGED <= replica.keys(), f"{label}: missing {LOGGED - replica.keys()}"
    for path, value in replica.items():
        expected = reference[path.split("@")[0]]
        np.testing.assert_allclose(
            value, expected, rtol=1e-5, atol=1e-6, err_msg=f"{label}: {path}"
        )


REDUCTIONS = (
    "cross_replica_sum",
    "cross_replica_gather",
    "cross_replica_min",
    "cross_replica_max",
)


def test_inference_never_reduces_across_replicas(monkeypatch):
    """One replica may predict or evaluate alone (e.g. rank 0 under DDP).

    A reduction in inference would wait for replicas that never call it.
    """
    calls = []
    for name in REDUCTIONS:
        real = getattr(distributed, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(distributed, name, spy)
    model = all_layers.every_layer_model()
    model.compile(optimizer="sgd", loss="mse")
    x, labels = all_layers.data(2)
    y = all_layers.targets(len(x))
    model.predict([x, labels], batch_size=all_layers.BATCH, verbose=0)
    model.evaluate([x, labels], y, batch_size=all_layers.BATCH, verbose=0)
    model([x, labels])
    assert calls == []
    model.fit([x, labels], y, batch_size=all_layers.BATCH, verbose=0)
    # The spies see the training step: every layer reduces there.
    assert set(calls) == set(REDUCTIONS)


ACCUMULATE = pytest.mark.parametrize(
    "accumulate", ["1", "2"], ids=["per-batch", "accumulating-2"]
)


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on JAX")
@ACCUMULATE
def test_jax_data_parallel_on_four_devices_matches_one_device(tmp_path, accumulate):
    env = {"ACCUMULATE": accumulate}
    single = run_worker("single", tmp_path / "single.npz", **env)
    parallel = run_worker("jax-data-parallel", tmp_path / "parallel.npz", **env)
    assert parallel.keys() == single.keys()
    assert_same_state(single, parallel, "DataParallel(4 CPU devices)")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute on TensorFlow")
@ACCUMULATE
def test_tf_mirrored_strategy_replicas_match_one_device(tmp_path, accumulate):
    env = {"ACCUMULATE": accumulate}
    single = run_worker("single", tmp_path / "single.npz", **env)
    mirrored = run_worker("tf-mirrored", tmp_path / "mirrored.npz", **env)
    replicas = {path.split("@")[1] for path in mirrored if "@" in path}
    assert replicas == {"0", "1"}, "each replica's copy must be checked"
    assert_same_state(single, mirrored, "MirroredStrategy(2 CPU devices)")


def wait_for_ranks(ranks, logs, timeout):
    """Wait for every rank; if one fails or time runs out, stop all and report.

    A rank that dies leaves the others blocked in a collective, so waiting on
    rank 0 alone would hide the real error behind a timeout.
    """
    deadline = time.monotonic() + timeout
    while any(process.poll() is None for process in ranks):
        failed = [p for p in ranks if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for process in ranks:
        if process.poll() is None:
            process.kill()
    reports = []
    for rank, (process, log) in enumerate(zip(ranks, logs, strict=True)):
        process.wait()
        if process.returncode != 0:
            stderr = log.read_text(errors="replace")[-3000:]
            reports.append(f"rank {rank} exit {process.returncode}:\n{stderr}")
    assert not reports, "\n\n".join(reports)


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed on PyTorch")
@ACCUMULATE
def test_torch_ddp_ranks_with_uneven_batches_match_one_process(tmp_path, accumulate):
    single = run_worker("torch-single", tmp_path / "single.npz", ACCUMULATE=accumulate)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    handles = [log.open("w") for log in logs]
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
                # Both ranks are on this host: keep gloo on loopback rather than
                # the address the host name resolves to (unreachable in sandboxes).
                "GLOO_SOCKET_IFNAME": "lo",
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "ACCUMULATE": accumulate,
            },
            stdout=subprocess.DEVNULL,
            # A file, not a pipe: a full pipe would block a rank while we poll.
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
        replica = dict(np.load(tmp_path / f"rank{rank}.npz"))
        assert replica.keys() == single.keys()
        assert_same_state(single, replica, f"DDP rank {rank} (batches of 9 and 7)")
