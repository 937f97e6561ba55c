"""MemoryBank against a NumPy re-implementation of lemniscate.pytorch's LinearAverage.

The reference: `v = m * memory[y] + (1 - m) * x; memory[y] = v / ||v||`, the bank
returned as it was before the batch; duplicate ids use the mean of their features
(the rule MemoryBank documents; lemniscate's `index_copy_` leaves it undefined).
"""

import keras
import numpy as np
import pytest

from backends_test.helpers import BACKEND, jax_copies_of_state, value_of
from keras_stateful.layers import MemoryBank
from keras_stateful.testing import check_state_contract, state_snapshot

N, D = 12, 4


class NumpyBank:
    def __init__(self, bank, momentum):
        self.bank = np.array(bank, "float64")
        self.momentum = momentum

    def __call__(self, features, ids):
        before = self.bank.copy()
        for i in np.unique(ids):
            f = features[ids == i].astype("float64").mean(axis=0)
            v = self.momentum * before[i] + (1 - self.momentum) * f
            self.bank[i] = v / np.linalg.norm(v)
        return before


def built_bank(**kwargs):
    layer = MemoryBank(N, seed=3, **kwargs)
    layer.build([(None, D), (None,)])
    return layer


def batches(rng, steps=5, size=6, duplicates=False):
    for _ in range(steps):
        features = rng.normal(size=(size, D)).astype("float32")
        if duplicates:
            ids = rng.integers(0, 4, size=size)  # ids 0..3, repeated
        else:
            ids = rng.permutation(N)[:size]
        yield features, ids.astype("int32")


@pytest.mark.parametrize("momentum", [0.5, 0.0, 0.9])
@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct", "duplicates"])
def test_matches_linear_average_over_steps(momentum, duplicates, rng):
    layer = built_bank(momentum=momentum)
    reference = NumpyBank(value_of(layer.bank), momentum)
    for features, ids in batches(rng, duplicates=duplicates):
        memory = layer([features, ids], training=True)
        expected_before = reference(features, ids)
        np.testing.assert_allclose(
            value_of(memory), expected_before, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            value_of(layer.bank), reference.bank, rtol=1e-5, atol=1e-6
        )
        written = value_of(layer.bank)[np.unique(ids)]
        np.testing.assert_allclose(np.linalg.norm(written, axis=1), 1.0, rtol=1e-6)


def test_default_bank_is_lemniscates_uniform_with_rows_near_unit_norm():
    layer = MemoryBank(2000, seed=0)
    layer.build([(None, 48), (None,)])
    bank = value_of(layer.bank)
    bound = 1 / np.sqrt(48 / 3)
    assert bank.min() >= -bound and bank.max() <= bound
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1).mean(), 1.0, atol=0.02)
    again = MemoryBank(2000, seed=0)
    again.build([(None, 48), (None,)])
    np.testing.assert_array_equal(value_of(again.bank), bank)


def test_duplicate_ids_move_once_by_their_mean_in_any_order(rng):
    features = rng.normal(size=(5, D)).astype("float32")
    ids = np.array([3, 7, 3, 3, 1], "int32")
    layer = built_bank(momentum=0.5)
    before = value_of(layer.bank)
    layer([features, ids], training=True)
    v = 0.5 * before[3] + 0.5 * features[[0, 2, 3]].mean(axis=0)
    np.testing.assert_allclose(
        value_of(layer.bank)[3], v / np.linalg.norm(v), rtol=1e-5
    )
    shuffled = built_bank(momentum=0.5)
    order = rng.permutation(5)
    shuffled([features[order], ids[order]], training=True)
    np.testing.assert_allclose(
        value_of(shuffled.bank), value_of(layer.bank), rtol=1e-6, atol=1e-7
    )


def test_rows_outside_the_batch_do_not_move(rng):
    layer = built_bank()
    before = value_of(layer.bank)
    ids = np.array([2, 9], "int32")
    layer([rng.normal(size=(2, D)).astype("float32"), ids], training=True)
    after = value_of(layer.bank)
    keep = np.setdiff1d(np.arange(N), ids)
    np.testing.assert_array_equal(after[keep], before[keep])
    assert not np.allclose(after[ids], before[ids])


def test_inference_returns_the_bank_and_moves_nothing(rng):
    layer = built_bank(num_negatives=3)
    features = rng.normal(size=(4, D)).astype("float32")
    ids = np.arange(4, dtype="int32")
    before = state_snapshot(layer)
    first = [value_of(t) for t in layer([features, ids])]
    second = [value_of(t) for t in layer([features, ids], training=False)]
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, before[name])
    # No update: the same draw from the same seed.
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[0], before["bank"][first[1]])


@pytest.mark.parametrize("hold", ["tensor", "numpy"])
def test_each_returned_bank_stays_the_bank_before_its_batch(hold, rng):
    """PyTorch writes rows in place; a kept bank must not see later writes."""
    layer = built_bank()
    reference = NumpyBank(value_of(layer.bank), 0.5)
    held, expected = [], []
    for features, ids in batches(rng, steps=4):
        memory = layer([features, ids], training=True)
        expected.append(reference(features, ids))
        held.append(memory if hold == "tensor" else keras.ops.convert_to_numpy(memory))
    for step, (memory, before) in enumerate(zip(held, expected, strict=True)):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(memory),
            before,
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"{step}",
        )


def test_negatives_are_rows_before_the_update_at_seeded_ids(rng):
    layer = built_bank(num_negatives=64)
    reference = NumpyBank(value_of(layer.bank), 0.5)
    draws = []
    for features, ids in batches(rng, steps=3):
        negatives, negative_ids = layer([features, ids], training=True)
        before = reference(features, ids)
        negative_ids = value_of(negative_ids)
        assert negatives.shape == (64, D) and negative_ids.dtype == np.int32
        assert negative_ids.min() >= 0 and negative_ids.max() < N
        np.testing.assert_allclose(
            value_of(negatives), before[negative_ids], rtol=1e-5, atol=1e-6
        )
        draws.append(negative_ids)
    assert not np.array_equal(draws[0], draws[1]), "the seed must advance"
    np.testing.assert_allclose(value_of(layer.bank), reference.bank, rtol=1e-5)
    np.testing.assert_array_equal(value_of(layer.sampler_seed), [3, 3])
    # Another layer with the same seed draws the same ids at the same steps.
    twin = built_bank(num_negatives=64)
    for features, ids in batches(np.random.default_rng(0), steps=1):
        np.testing.assert_array_equal(
            value_of(twin([features, ids], training=True)[1]), draws[0]
        )


def test_frozen_layer_draws_without_advancing_the_seed(rng):
    layer = built_bank(num_negatives=5)
    features, ids = next(batches(rng, steps=1))
    layer.freeze_state()
    first = value_of(layer([features, ids], training=True)[1])
    second = value_of(layer([features, ids], training=True)[1])
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(value_of(layer.sampler_seed), [3, 0])


def test_saved_model_draws_the_same_negatives(tmp_path, rng):
    features_in = keras.Input((D,))
    ids_in = keras.Input((), dtype="int32")
    negatives, negative_ids = MemoryBank(N, num_negatives=6, seed=5, name="bank")(
        [features_in, ids_in]
    )
    model = keras.Model([features_in, ids_in], [negatives, negative_ids])
    features, ids = next(batches(rng, steps=1))
    bank = model.get_layer("bank")
    bank([features, ids], training=True)
    bank([features, ids], training=True)
    path = tmp_path / "bank.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for name, value in state_snapshot(bank).items():
        np.testing.assert_array_equal(
            state_snapshot(loaded.get_layer("bank"))[name], value
        )
    expected = value_of(bank([features, ids], training=True)[1])
    got = value_of(loaded.get_layer("bank")([features, ids], training=True)[1])
    np.testing.assert_array_equal(got, expected)


def test_out_of_range_ids_are_an_eager_error(rng):
    layer = built_bank()
    features = rng.normal(size=(3, D)).astype("float32")
    with pytest.raises(
        ValueError, match=r"in \[0, 12\); received \[12, -1\].*num_samples"
    ):
        layer([features, np.array([0, 12, -1], "int32")], training=True)


@pytest.mark.skipif(BACKEND == "torch", reason="PyTorch's fit runs eagerly: an error")
def test_out_of_range_ids_in_compiled_fit_update_nothing_and_are_counted(rng):
    features = rng.normal(size=(6, D)).astype("float32")
    ids = np.array([0, 0, 99, 5, -3, 5], "int32")
    inputs = [keras.Input((D,)), keras.Input((), dtype="int32")]
    layer = MemoryBank(N, seed=3, name="bank")
    memory = layer(inputs)
    model = keras.Model(inputs, keras.layers.Lambda(lambda m: m[:6, :1] * 0.0)(memory))
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    layer([features[:1], ids[:1]])
    reference = NumpyBank(value_of(layer.bank), 0.5)
    model.fit([features, ids], np.zeros((6, 1)), batch_size=6, verbose=0)
    keep = (ids >= 0) & (ids < N)
    reference(features[keep], ids[keep])
    np.testing.assert_allclose(
        value_of(layer.bank), reference.bank, rtol=1e-5, atol=1e-6
    )
    assert state_snapshot(layer)["out_of_range_ids"] == 2


def test_non_finite_features_update_nothing_and_are_counted(rng):
    layer = built_bank(num_negatives=2)
    features, ids = next(batches(rng, steps=1))
    features[1, 2] = np.nan
    before = state_snapshot(layer)
    layer([features, ids], training=True)
    assert layer.skipped_updates == 1
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, before[name])


def test_empty_batch_returns_the_bank_and_moves_nothing():
    layer = built_bank()
    before = state_snapshot(layer)
    memory = layer(
        [np.zeros((0, D), "float32"), np.zeros((0,), "int32")], training=True
    )
    np.testing.assert_array_equal(value_of(memory), before["bank"])
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, before[name])
    assert layer.skipped_updates == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 0}, r"num_samples must be an int >= 1.*num_samples=0"),
        ({"num_samples": True}, r"num_samples must be an int >= 1.*num_samples=True"),
        (
            {"num_samples": 10.0},
            r"num_samples must be an int >= 1.*MemoryBank\(50000\)",
        ),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\).*momentum=0.5"),
        ({"num_negatives": 0}, r"num_negatives must be an int >= 1.*or None"),
        ({"seed": 1.5}, r"seed must be an int or None"),
    ],
)
def test_bad_arguments_say_what_to_write(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MemoryBank(**{"num_samples": N, **kwargs})


def test_bad_argument_message_in_full():
    with pytest.raises(ValueError) as error:
        MemoryBank(2.5)
    assert str(error.value) == (
        "MemoryBank: num_samples must be an int >= 1 (one row per training "
        "sample); received num_samples=2.5. Write e.g. `MemoryBank(50000)`."
    )


def test_bad_inputs_say_how_to_call(rng):
    layer = built_bank()
    features = rng.normal(size=(3, D)).astype("float32")
    with pytest.raises(ValueError, match=r"\[features, sample_ids\]"):
        MemoryBank(N)(features)
    with pytest.raises(TypeError, match=r"integers; received dtype float32.*int32"):
        layer([features, np.array([0.0, 1.0, 2.0], "float32")])
    with pytest.raises(ValueError, match=r"shape \(B,\) or \(B, 1\).*\(3, 2\)"):
        layer([features, np.zeros((3, 2), "int32")])
    with pytest.raises(ValueError, match=r"shape \(batch, 4\).*\(3, 5\).*Flatten"):
        layer([rng.normal(size=(3, 5)).astype("float32"), np.arange(3)])
    with pytest.raises(TypeError, match=r"floats; received dtype int32"):
        layer([np.ones((3, D), "int32"), np.arange(3)])


def test_config_round_trip():
    layer = MemoryBank(
        100, 0.7, num_negatives=8, seed=2, bank_initializer="zeros", name="npid"
    )
    clone = MemoryBank.from_config(layer.get_config())
    assert (clone.num_samples, clone.momentum, clone.num_negatives, clone.seed) == (
        100,
        0.7,
        8,
        2,
    )
    assert isinstance(clone.bank_initializer, keras.initializers.Zeros)


def contract_inputs(rng):
    # Two steps of 4 distinct ids each (and one id seen in both steps).
    features = rng.normal(size=(8, D)).astype("float32")
    ids = np.array([0, 5, 7, 2, 7, 11, 3, 1], "int32")
    return [features, ids]


def test_state_contract_whole_bank(rng):
    check_state_contract(lambda: MemoryBank(N, seed=4), contract_inputs(rng))


def test_state_contract_sampled_negatives(rng):
    check_state_contract(
        lambda: MemoryBank(N, 0.3, num_negatives=5, seed=4), contract_inputs(rng)
    )


def test_guide_examples_run_and_do_what_they_say():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parent.parent
    guide = (root / "docs" / "memory-bank.md").read_text()
    whole, sampled = re.findall(r"```python\n(.*?)```", guide, re.S)
    namespace = {}
    exec(compile(whole, "memory-bank.md", "exec"), namespace)
    assert value_of(namespace["logits"]).shape == (32, 1000)
    assert np.isfinite(value_of(namespace["loss"]))
    memory, features = value_of(namespace["memory"]), value_of(namespace["features"])
    moved = 0.5 * memory[:32] + 0.5 * features
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    bank = value_of(namespace["memory_bank"].bank)
    np.testing.assert_allclose(bank[:32], moved, atol=1e-6)
    np.testing.assert_array_equal(bank[32:], memory[32:])
    exec(compile(sampled, "memory-bank.md", "exec"), namespace)
    assert value_of(namespace["negatives"]).shape == (256, 128)
    assert value_of(namespace["negative_logits"]).shape == (32, 256)


@pytest.mark.skipif(BACKEND != "jax", reason="XLA's compiled step")
def test_jax_train_step_with_negatives_writes_the_bank_rows_in_place(rng):
    # The negatives and the update's rows are read before the rows are
    # written; otherwise XLA copies the whole (N, D) bank every step.
    samples, dim, batch = 3000, 8, 16
    inputs = [keras.Input((dim,)), keras.Input((), dtype="int32")]
    hidden = keras.layers.Dense(dim)(inputs[0])
    negatives, _ = MemoryBank(samples, num_negatives=32, seed=0)([hidden, inputs[1]])
    logits = keras.ops.matmul(hidden, keras.ops.transpose(negatives))
    model = keras.Model(inputs, logits)
    x = rng.normal(size=(batch, dim)).astype("float32")
    ids = rng.permutation(samples)[:batch].astype("int32")
    assert jax_copies_of_state(model, [x, ids], (samples, dim)) == []
