"""Runs of the multi-device workers in fresh processes, for the data-parallel tests.

Virtual devices (JAX's host device count, TensorFlow's logical CPUs) and a
`torch.distributed` group are fixed when a process starts, so each
data-parallel run is a subprocess of one of the `*_worker.py` modules here.
A worker is called as `python -m backends_test.<worker> MODE OUT.npz` and
writes its results to `OUT.npz`; a data-parallel run also writes the
one-device run it is compared with, which `reference` reads.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

from backends_test.helpers import BACKEND
from backends_test.worker_process import reference_path

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_worker(worker, mode, out, timeout=300, **env):
    """Run `worker` in `mode` on the running backend; its results by name."""
    completed = subprocess.run(
        [sys.executable, "-m", f"backends_test.{worker}", mode, str(out)],
        cwd=ROOT,
        env={
            **os.environ,
            "KERAS_BACKEND": BACKEND,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return dict(np.load(out))


def reference(out):
    """The one-device results a data-parallel run to `out` wrote beside it.

    For torch DDP, `out` is rank 0's file (`folder / "rank0.npz"`).
    """
    return dict(np.load(reference_path(out)))


def run_torch_ranks(worker, mode, folder, world=2, timeout=240, **env):
    """`world` torch DDP ranks of `worker` on loopback; each one's results, by rank."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    logs = [folder / f"rank{rank}.log" for rank in range(world)]
    outs = [folder / f"rank{rank}.npz" for rank in range(world)]
    handles = [log.open("w") for log in logs]
    common = {
        **os.environ,
        "KERAS_BACKEND": "torch",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        # Every rank is on this host: keep gloo on loopback rather than the
        # address the host name resolves to (unreachable in sandboxes).
        "GLOO_SOCKET_IFNAME": "lo",
        "WORLD_SIZE": str(world),
        **env,
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", f"backends_test.{worker}", mode, str(outs[rank])],
            cwd=ROOT,
            env={**common, "RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            # A file, not a pipe: a full pipe would block a rank while we poll.
            stderr=handles[rank],
        )
        for rank in range(world)
    ]
    try:
        wait_for_ranks(ranks, logs, timeout)
    finally:
        for handle in handles:
            handle.close()
    return [dict(np.load(out)) for out in outs]


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
