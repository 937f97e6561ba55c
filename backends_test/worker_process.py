"""The start and end of a data-parallel worker process (`*_worker.py`).

A worker runs as `python -m backends_test.<worker> MODE OUT.npz`. Virtual
devices are fixed when a process starts, so `prepare` sets them up from MODE
before Keras is imported; `finish` runs MODE and writes its results to
OUT.npz. A data-parallel MODE first runs its one-device reference in the same
process (the rank-0 process under torch DDP) and writes it to
`reference_path(OUT)`: one process start fewer per comparison.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

# Multi-device mode -> the one-device mode it is compared with.
REFERENCE = {
    "jax-data-parallel": "single",
    "tf-mirrored": "single",
    "torch-ddp": "torch-single",
    "model-parallel": "single",
    "tf-model-parallel": "single",
    "torch-model-parallel": "single",
}


def prepare(module_name: str) -> str:
    """MODE from the command line ("single" when imported), with its devices."""
    mode = sys.argv[1] if module_name == "__main__" else "single"
    if mode == "jax-data-parallel":
        os.environ["KERAS_BACKEND"] = "jax"
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    elif mode == "tf-mirrored":
        os.environ["KERAS_BACKEND"] = "tensorflow"
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    elif mode.startswith("torch"):
        os.environ["KERAS_BACKEND"] = "torch"
    return mode


def reference_path(out: Any) -> pathlib.Path:
    """Where a data-parallel run writes its one-device reference."""
    out = pathlib.Path(out)
    return out.with_name(f"{out.stem}.reference.npz")


def finish(runs: Mapping[str, Callable[[], dict[str, Any]]]) -> None:
    """Run MODE (after its one-device reference, if any) and write the results."""
    import keras
    import numpy as np

    mode, out = sys.argv[1], sys.argv[2]
    reference = REFERENCE.get(mode)
    if reference in runs and os.environ.get("RANK", "0") == "0":
        np.savez(reference_path(out), **runs[reference]())
        keras.utils.clear_session()  # the same layer names again
    np.savez(out, **runs[mode]())


def leave_process_group() -> None:
    """Meet every rank, then leave the torch process group.

    Free the DDP wrappers first: a wrapper freed after another rank has left
    can block this one's exit. The reference run makes rank 0 start later
    than the others, so they do leave first.
    """
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
