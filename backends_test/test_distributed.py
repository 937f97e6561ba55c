"""Data-parallel training on each backend's own engine ends with the one-device state.

A model with every stateful layer trains for 3 steps on the same global batches,
once on one device and once data-parallel; every replica's state must equal the
one-device state within 1e-5. Each engine needs a fresh process (virtual devices
are fixed at start-up), so the runs are subprocesses of
`backends_test/distributed_worker.py`.
"""

import numpy as np
import pytest

from backends_test import all_layers, launch
from backends_test.helpers import BACKEND
from keras_stateful import distributed


def run_worker(mode, out, **env):
    return launch.run_worker("distributed_worker", mode, out, **env)


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
    parallel = run_worker("jax-data-parallel", tmp_path / "parallel.npz", **env)
    single = launch.reference(tmp_path / "parallel.npz")
    assert parallel.keys() == single.keys()
    assert_same_state(single, parallel, "DataParallel(4 CPU devices)")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute on TensorFlow")
@ACCUMULATE
def test_tf_mirrored_strategy_replicas_match_one_device(tmp_path, accumulate):
    env = {"ACCUMULATE": accumulate}
    mirrored = run_worker("tf-mirrored", tmp_path / "mirrored.npz", **env)
    single = launch.reference(tmp_path / "mirrored.npz")
    replicas = {path.split("@")[1] for path in mirrored if "@" in path}
    assert replicas == {"0", "1"}, "each replica's copy must be checked"
    assert_same_state(single, mirrored, "MirroredStrategy(2 CPU devices)")


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed on PyTorch")
@ACCUMULATE
def test_torch_ddp_ranks_with_uneven_batches_match_one_process(tmp_path, accumulate):
    ranks = launch.run_torch_ranks(
        "distributed_worker", "torch-ddp", tmp_path, ACCUMULATE=accumulate
    )
    single = launch.reference(tmp_path / "rank0.npz")
    for rank, replica in enumerate(ranks):
        assert replica.keys() == single.keys()
        assert_same_state(single, replica, f"DDP rank {rank} (batches of 9 and 7)")
