"""Bad input, tried on purpose, on every layer.

Each bad input meets each layer with one of four outcomes (the table
`EXPECTED`, written out in docs/guarantees.md):

- `RAISES`: a `ValueError` or `TypeError`, in training and in inference,
  whose message names the layer (`'name'`), shows what was received and says
  what to pass instead; the state is untouched.
- `SKIPS`: no error; the update is skipped whole (the state bit for bit as
  before) and counted in `layer.skipped_updates`.
- `IGNORES`: no error; nothing to learn from, so no update and no count.
- `UPDATES`: not bad for this layer: a normal update; state and output finite
  (for a wrapper, output finite where the wrapped layer's own output is).

Eagerly is where the errors are raised. Inside a compiled `fit` a bad batch
(non-finite values, a last batch of one) leaves the state as if the batch
had not come, is counted, and training goes on.
"""

import re

import keras
import numpy as np
import pytest

from backends_test import all_layers
from backends_test.helpers import BACKEND, value_of
from keras_stateful.layers import FakeQuant, MovingMoments
from keras_stateful.testing import state_snapshot

F = all_layers.FEATURES


LAYERS = {
    **all_layers.LAYERS,
    "fake_quant_per_tensor": lambda: FakeQuant(8, averaging_constant=0.1, name="quant"),
    "moving_moments_unbiased": lambda: MovingMoments(
        momentum=0.9, unbiased=True, name="moments"
    ),
}


def features(rng, rows=all_layers.BATCH):
    return rng.normal(1.0, 2.0, size=(rows, F)).astype("float32")


def labels_for(x, rng):
    return rng.integers(0, all_layers.CLASSES, size=(len(x),)).astype("int32")


def with_value(value):
    def make(rng):
        x = features(rng)
        x[3, 1] = value
        return x, None

    return make


# Each bad input: how to make it, and what a helpful error must show of it.
BAD_INPUTS = {
    "extra_axis": (lambda rng: (features(rng)[:, None, :], None), "(8, 1, 4)"),
    "missing_axis": (lambda rng: (features(rng)[:, 0], None), "(8,)"),
    "wrong_last_dim": (
        lambda rng: (rng.normal(size=(8, F + 1)).astype("float32"), None),
        "(8, 5)",
    ),
    "int_inputs": (lambda rng: (np.ones((8, F), "int32"), None), "int32"),
    "float_labels": (
        lambda rng: (features(rng), np.zeros(8, "float32")),
        "float32",
    ),
    "labels_out_of_range": (
        lambda rng: (features(rng), np.array([0, 1, 2, 3, 0, 1, 2, -1], "int32")),
        "[3, -1]",
    ),
    "nan": (with_value(np.nan), None),
    "inf": (with_value(np.inf), None),
    "neg_inf": (with_value(-np.inf), None),
    "empty": (lambda rng: (features(rng, 0), None), None),
    "batch_of_one": (lambda rng: (features(rng, 1), None), None),
    "offset_1e6": (lambda rng: (1e6 + features(rng), None), None),
    # Run under the mixed_float16 policy: the layer computes in float16.
    "float16_max": (
        lambda rng: (np.tile(np.float16([65504, -65504, 1, 0]), (8, 1)), None),
        None,
    ),
}

RAISES, SKIPS, IGNORES, UPDATES = "raises", "skips", "ignores", "updates"
NON_FINITE = {"nan": SKIPS, "inf": SKIPS, "neg_inf": SKIPS}
EXTREME = {"batch_of_one": UPDATES, "offset_1e6": UPDATES, "float16_max": UPDATES}
SHAPES_FIXED = {"extra_axis": RAISES, "missing_axis": RAISES, "wrong_last_dim": RAISES}
STATISTICS = {**SHAPES_FIXED, **NON_FINITE, **EXTREME, "int_inputs": UPDATES}
# Wrappers whose state comes from the wrapped Dense's weights: its input spec
# (rank >= 2, last axis 4) is theirs, and no input value is bad for the state.
WEIGHTS_STATE = {
    **EXTREME,
    **dict.fromkeys(NON_FINITE, UPDATES),
    "extra_axis": UPDATES,  # Dense takes (batch, ..., 4)
    "missing_axis": RAISES,
    "wrong_last_dim": RAISES,
    "int_inputs": UPDATES,
    "empty": UPDATES,
}
EXPECTED = {
    "center_loss": {
        **STATISTICS,
        "float_labels": RAISES,
        "labels_out_of_range": RAISES,
        "empty": IGNORES,
    },
    "moving_average": {**STATISTICS, "empty": SKIPS},
    "moving_moments": {**STATISTICS, "empty": SKIPS},
    "moving_moments_unbiased": {**STATISTICS, "empty": SKIPS, "batch_of_one": SKIPS},
    "running_standardization": {**STATISTICS, "empty": SKIPS},
    "memory_queue": {**STATISTICS, "int_inputs": RAISES, "empty": IGNORES},
    "fake_quant": {**STATISTICS, "empty": IGNORES},
    "fake_quant_per_tensor": {
        **STATISTICS,
        # One range over the whole tensor: any shape is fine.
        "extra_axis": UPDATES,
        "missing_axis": UPDATES,
        "wrong_last_dim": UPDATES,
        "empty": IGNORES,
    },
    "vector_quantizer_ema": {
        **STATISTICS,
        "extra_axis": UPDATES,  # (batch, ..., embedding_dim) is its input
        "int_inputs": RAISES,
        "empty": IGNORES,
    },
    "percentile_normalization": {
        **STATISTICS,
        # Percentiles of all elements, flattened: any shape is fine.
        "extra_axis": UPDATES,
        "missing_axis": UPDATES,
        "wrong_last_dim": UPDATES,
        "int_inputs": RAISES,
        "empty": IGNORES,
    },
    "memory_bank": {
        **STATISTICS,
        "int_inputs": RAISES,
        "float_labels": RAISES,
        "labels_out_of_range": RAISES,
        "empty": IGNORES,
    },
    "averaged_model": WEIGHTS_STATE,
    "spectral_normalization": WEIGHTS_STATE,
    "sync_batch_normalization": {**STATISTICS, "empty": SKIPS},
}

# (layer, bad input) pairs a layer does not meet yet, with the reason; each
# is an xfail(strict=True), so the fix shows as an XPASS to remove here.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def cases():
    for name, table in EXPECTED.items():
        for bad, outcome in table.items():
            marks = []
            if (name, bad) in KNOWN_FAILURES:
                marks = [
                    pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name, bad])
                ]
            yield pytest.param(name, bad, outcome, marks=marks, id=f"{name}-{bad}")


def call(name, layer, x, labels=None, rng=None, **kwargs):
    if all_layers.labelled(name):
        if labels is None:
            labels = labels_for(x, rng)
        return layer([x, labels], **kwargs)
    return layer(x, **kwargs)


HINT = re.compile(
    r"expected|must|Write|Pass|Cast|Declare|Flatten|Project|Raise|Give|e\.g\."
)


def assert_helpful(error, layer, received):
    # Keras appends the call's arguments (shapes and dtypes) to an error
    # raised in `call()`; the layer's own words must say it.
    message = str(error).split("Arguments received by")[0]
    assert f"'{layer.name}'" in message, f"the layer is not named: {message}"
    assert received in message, f"{received} is not shown: {message}"
    assert HINT.search(message), f"no hint of what to pass: {message}"


def finite(values):
    return all(np.all(np.isfinite(v)) for v in values)


@pytest.mark.parametrize(("name", "bad", "outcome"), cases())
def test_bad_input_eagerly(name, bad, outcome, rng):
    make, received = BAD_INPUTS[bad]
    if bad == "float16_max":
        keras.config.set_dtype_policy("mixed_float16")
    layer = LAYERS[name]()
    # Build and update once; float16's extremes come first, as the range a
    # first batch sets is exactly its min and max.
    call(name, layer, features(rng), rng=rng, training=bad != "float16_max")
    before, skipped = state_snapshot(layer), layer.skipped_updates
    x, labels = make(rng)

    if outcome == RAISES:
        for training in (True, False):
            with pytest.raises((ValueError, TypeError)) as error:
                call(name, layer, x, labels, rng, training=training)
            assert_helpful(error.value, layer, received)
        outputs = None
    else:
        outputs = call(name, layer, x, labels, rng, training=True)

    after = state_snapshot(layer)
    assert finite(after.values()), f"non-finite state: {after}"
    unchanged = all(np.array_equal(after[k], before[k]) for k in before)
    if outcome == UPDATES:
        assert not unchanged, "the state did not update"
        assert layer.skipped_updates == skipped
        output = keras.tree.flatten(outputs)[0]
        if output_should_be_finite(name, layer, x):
            assert finite([keras.ops.convert_to_numpy(output)]), "non-finite output"
    else:
        assert unchanged, "the state moved"
        expected_skips = skipped + (outcome == SKIPS)
        assert layer.skipped_updates == expected_skips
    if outcome == IGNORES:
        output = keras.tree.flatten(outputs)[0]
        rows = {
            "memory_queue": all_layers.QUEUE_SIZE,
            "memory_bank": all_layers.BANK_SIZE,
        }
        assert keras.ops.shape(output)[0] == rows.get(name, 0)


def output_should_be_finite(name, layer, x):
    """Always, but for a wrapper: where the wrapped layer's own output is.

    A wrapper computes the wrapped layer's function (with other weights): a
    NaN input gives a NaN output, and a Dense in float16 overflows.
    """
    if name not in all_layers.STATE_FROM_WEIGHTS:
        return True
    return finite([keras.ops.convert_to_numpy(layer.layer(x))])


def test_large_offset_keeps_the_moving_variance(rng):
    # momentum 0: the moving moments are those of the last batch.
    x = (1e6 + rng.normal(0.0, 1.0, size=(256, F))).astype("float32")
    layer = MovingMoments(momentum=0.0)
    layer(x, training=True)
    data = x.astype("float64")
    np.testing.assert_allclose(value_of(layer.moving_mean), data.mean(0), rtol=1e-7)
    np.testing.assert_allclose(value_of(layer.moving_variance), data.var(0), rtol=1e-4)


# ---- inside fit ---------------------------------------------------------------


def side_branch_model(name, layer):
    """The layer on the raw inputs beside a clean Dense branch with the loss.

    The layer's output carries no loss, so the bad values cannot reach the
    Dense weights through a gradient; what is tested is the layer's state.
    """
    x = keras.Input((F,), name="x")
    labels = keras.Input((), dtype="int32", name="labels")
    clean = keras.Input((1,), name="clean")
    out = layer([x, labels]) if all_layers.labelled(name) else layer(x)
    prediction = keras.layers.Dense(1, name="dense")(clean)
    return keras.Model([x, labels, clean], {"dense": prediction, "state": out})


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_bad_batches_inside_fit_are_skipped_counted_and_training_goes_on(name, rng):
    good = [features(rng) for _ in range(3)]
    nan_batch, inf_batch, one = features(rng), features(rng), features(rng, 1)
    nan_batch[2, 1] = np.nan
    inf_batch[5, 3] = np.inf
    order = [good[0], nan_batch, good[1], inf_batch, good[2], one]
    x = np.concatenate(order)
    labels = labels_for(x, rng)
    clean = np.ones((len(x), 1), "float32")

    model = side_branch_model(name, LAYERS[name]())
    model.compile(optimizer="sgd", loss={"dense": "mse"})
    model.fit(
        [x, labels, clean],
        {"dense": clean},
        batch_size=all_layers.BATCH,
        shuffle=False,
        verbose=0,
    )
    layer = next(iter(all_layers.stateful_layers(model)))

    # The reference: the same layer, eagerly, on the batches that are not bad
    # (all of them for a wrapper, whose state reads no input value).
    reading_inputs = name not in all_layers.STATE_FROM_WEIGHTS
    reference = LAYERS[name]()
    start = 0
    for batch in order:
        batch_labels = labels[start : start + len(batch)]
        bad = batch is nan_batch or batch is inf_batch
        if not (bad and reading_inputs):
            call(name, reference, batch, batch_labels, training=True)
        start += len(batch)
    actual, expected = state_snapshot(layer), state_snapshot(reference)
    assert finite(actual.values())
    for key in expected:
        np.testing.assert_allclose(
            actual[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key
        )
    assert layer.skipped_updates == reference.skipped_updates + 2 * reading_inputs
    assert int(value_of(model.optimizer.iterations)) == len(order)
    assert finite(value_of(w) for w in model.get_layer("dense").weights)


def test_out_of_range_labels_inside_fit(rng):
    x = features(rng, 16)
    labels = labels_for(x, rng)
    labels[[3, 12]] = [all_layers.CLASSES, -1]
    model = side_branch_model("center_loss", all_layers.LAYERS["center_loss"]())
    model.compile(optimizer="sgd", loss={"dense": "mse"})
    clean = np.ones((16, 1), "float32")
    fit = lambda: model.fit(  # noqa: E731
        [x, labels, clean], {"dense": clean}, batch_size=8, shuffle=False, verbose=0
    )
    if BACKEND == "torch":
        # PyTorch's fit runs eagerly: the eager error, naming the labels.
        with pytest.raises(ValueError, match=r"'center_loss'.*received \[3\]"):
            fit()
        return
    fit()
    layer = model.get_layer("center_loss")
    reference = all_layers.LAYERS["center_loss"]()
    for rows in (slice(0, 8), slice(8, 16)):
        keep = (labels[rows] >= 0) & (labels[rows] < all_layers.CLASSES)
        reference([x[rows][keep], labels[rows][keep]], training=True)
    np.testing.assert_allclose(
        value_of(layer.centers), value_of(reference.centers), rtol=1e-5, atol=1e-6
    )
    assert int(value_of(layer.out_of_range_labels)) == 2
    assert layer.skipped_updates == 0


def test_a_non_finite_key_that_its_own_batch_overwrites_still_skips_it(rng):
    layer = all_layers.LAYERS["memory_queue"]()
    layer(features(rng, 2), training=True)
    before = state_snapshot(layer)
    keys = features(rng, all_layers.QUEUE_SIZE + 3)
    keys[0, 1] = np.nan  # key 0 shares its slot with key QUEUE_SIZE
    layer(keys, training=True)
    after = state_snapshot(layer)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert layer.skipped_updates == 1
