"""State sharded across devices with `keras.distribution.ModelParallel`.

On JAX with 4 virtual CPU devices, docs/distributed.md's `LayoutMap` example
splits CenterLoss's centers, VectorQuantizerEMA's codebook and moving averages
and MemoryQueue's queue along their first axis over a `(1, 4)` mesh; `fit`
must end with the one-device state, each device must hold a quarter of the
rows, and the compiled training step must never move `K` (or `K / 4`) rows
between devices. On TensorFlow and PyTorch the tests show what Keras does
with the same example. The runs are subprocesses of
`backends_test/model_parallel_worker.py` (virtual devices are fixed at start),
each of which runs the one-device reference first.
"""

import re

import numpy as np
import pytest

from backends_test import launch
from backends_test import model_parallel_worker as worker
from backends_test.helpers import BACKEND

DEVICES = 4
ROWS = {
    "centers/centers": worker.CLASSES,
    "codebook/embeddings": worker.CODES,
    "codebook/ema_cluster_size": worker.CODES,
    "codebook/ema_cluster_size_hidden": worker.CODES,
    "codebook/ema_dw": worker.CODES,
    "codebook/ema_dw_hidden": worker.CODES,
    "queue/queue": worker.QUEUE,
}
SHAPE = re.compile(r"\b(?:pred|bf16|[fsu]\d+)\[([\d,]*)\]")


def run_worker(mode, out, **env):
    return launch.run_worker("model_parallel_worker", mode, out, timeout=600, **env)


def state_of(result):
    return {
        k: v
        for k, v in result.items()
        if "/" in k
        and k.split("/")[0] in ("centers", "codebook", "queue")
        and not k.startswith(("shards/", "devices/"))
    }


def assert_same_state(single, other, what):
    assert single.keys() == other.keys()
    for path, expected in single.items():
        np.testing.assert_allclose(
            other[path], expected, rtol=1e-5, atol=1e-5, err_msg=f"{what}: {path}"
        )


def state_sized_collectives(lines):
    """The collectives (HLO lines) that move more than batch-sized values.

    A collective may carry scalars and arrays of the batch's rows (`(B, ...)`:
    rows read, per-sample candidates); an operand or result of any other
    shape (`K` or `K / 4` rows of state, a chunk of the codebook) is listed.
    """
    found = []
    for line in lines:
        shapes = SHAPE.findall(line.split("metadata=")[0])
        if any(s and int(s.split(",")[0]) != worker.BATCH for s in shapes):
            found.append(line)
    return found


def test_the_hlo_check_catches_an_all_gather_of_state_rows():
    gather = (
        "%all-gather.3 = f32[64,6]{1,0} all-gather(f32[16,6]{1,0} %p), "
        "channel_id=3, dimensions={0}"
    )
    chunk = "%all-reduce.1 = f32[10,6]{1,0} all-reduce(f32[10,6]{1,0} %c)"
    row_sum = "%all-reduce = (f32[12,6]{1,0}, f32[]) all-reduce(f32[12,6]{1,0} %a)"
    assert state_sized_collectives([gather, chunk, row_sum]) == [gather, chunk]


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution.ModelParallel")
@pytest.mark.parametrize("search", ["whole", "chunked"])
def test_jax_state_sharded_over_four_devices_matches_one_device(tmp_path, search):
    env = {"CHUNKED_SEARCH": "1" if search == "chunked" else "0"}
    sharded = run_worker("model-parallel", tmp_path / "sharded.npz", **env)
    single = launch.reference(tmp_path / "sharded.npz")
    assert_same_state(state_of(single), state_of(sharded), "ModelParallel(1 x 4)")

    for path, rows in ROWS.items():
        shapes = sharded[f"shards/{path}"]
        assert len(shapes) == DEVICES, (path, shapes)
        assert (shapes[:, 0] == rows // DEVICES).all(), (path, shapes)
        assert single[path].shape[0] == rows

    collectives = [line for line in sharded["collectives"] if line]
    # The step communicates (batch-sized results), and the check sees it.
    assert collectives, sharded["modules"]
    assert state_sized_collectives(collectives) == [], "\n".join(collectives)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="what TensorFlow does")
def test_tensorflow_accepts_the_layout_map_but_keeps_state_whole(tmp_path):
    mesh = run_worker("tf-model-parallel", tmp_path / "mesh.npz")
    single = launch.reference(tmp_path / "mesh.npz")
    assert_same_state(state_of(single), state_of(mesh), "TF with a LayoutMap")
    for path, rows in ROWS.items():
        # Whole, on the first CPU: Keras's TF backend does not lay variables out.
        assert mesh[path].shape[0] == rows
        assert "CPU:0" in str(mesh[f"devices/{path}"][0]), mesh[f"devices/{path}"]


@pytest.mark.skipif(BACKEND != "torch", reason="what PyTorch does")
def test_torch_has_no_keras_distribution_backend(tmp_path):
    attempt = run_worker("torch-model-parallel", tmp_path / "attempt.npz")
    single = launch.reference(tmp_path / "attempt.npz")
    # Keras has no PyTorch distribution backend: the example fails at once.
    assert "list_devices" in str(attempt["error"][0]), attempt["error"]
    assert_same_state(state_of(single), state_of(attempt), "torch without sharding")
    for path in ROWS:
        assert "cpu" in str(attempt[f"devices/{path}"][0])
