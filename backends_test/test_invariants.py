"""The update rules' invariants, for any data hypothesis can think of.

Batch shapes come from small sets, so JAX's eager per-shape compilation
stays short; the values, orders, splits and interleavings are free.
"""

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends_test import all_layers
from backends_test.helpers import value_of
from keras_stateful.layers import (
    CenterLoss,
    FakeQuant,
    MemoryQueue,
    MovingAverage,
    MovingMoments,
    RunningStandardization,
    VectorQuantizerEMA,
)
from keras_stateful.testing import state_snapshot

F = all_layers.FEATURES
SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# What may come between two training batches without changing the state:
# an inference call, an empty batch, a batch with a NaN (skipped and counted).
NOISE = st.sampled_from(["none", "inference", "empty", "nan"])


def noise(layer, kind, rng, *, empty_is_skipped, rows=3):
    """Apply one `NOISE` event to `layer`; returns the skips it counts."""
    x = rng.normal(size=(rows, F)).astype("float32")
    if kind == "inference":
        layer(x, training=False)
    elif kind == "empty":
        layer(x[:0], training=True)
        return int(empty_is_skipped)
    elif kind == "nan":
        x[rows // 2, 1] = np.nan
        layer(x, training=True)
        return 1
    return 0


@SETTINGS
@given(
    sizes=st.lists(st.sampled_from([1, 3, 8]), min_size=1, max_size=6),
    between=st.lists(NOISE, min_size=6, max_size=6),
    offset=st.sampled_from([0.0, 1e6]),
)
def test_any_split_of_a_stream_with_anything_between_gives_its_statistics(
    sizes, between, offset
):
    rng = np.random.default_rng(len(sizes))
    stream = (offset + rng.normal(0.0, 2.0, (sum(sizes), F))).astype("float32")
    layer = RunningStandardization()
    skips, start = 0, 0
    for size, kind in zip(sizes, between, strict=False):
        layer(stream[start : start + size], training=True)
        start += size
        skips += noise(layer, kind, rng, empty_is_skipped=True)
    data = stream.astype("float64")
    np.testing.assert_array_equal(value_of(layer.count), np.full(F, len(data)))
    mean = value_of(layer.mean).astype("float64") + value_of(layer.mean_correction)
    # float32 spacing at 1e6 is 0.0625: the pair keeps the mean far finer.
    np.testing.assert_allclose(mean, data.mean(0), rtol=0, atol=1e-5 + 1e-12 * offset)
    np.testing.assert_allclose(value_of(layer.variance), data.var(0), rtol=1e-4)
    # A single value has variance 0, never a negative or NaN one.
    assert np.all(value_of(layer.variance) >= 0)
    assert layer.skipped_updates == skips


@SETTINGS
@given(
    labels=st.lists(st.integers(0, all_layers.CLASSES + 2), min_size=8, max_size=8),
    alpha=st.sampled_from([0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_a_center_loss_step_never_moves_an_absent_class(labels, alpha, seed):
    classes = all_layers.CLASSES + 3
    rng = np.random.default_rng(seed)
    layer = CenterLoss(
        classes, alpha, centers_initializer=keras.initializers.RandomNormal(seed=1)
    )
    x = rng.normal(size=(8, F)).astype("float32")
    ids = np.array(labels, "int32")
    layer([x, ids])
    before = value_of(layer.centers).astype("float64")
    layer([x, ids], training=True)
    after = value_of(layer.centers)
    absent = np.setdiff1d(np.arange(classes), ids)
    np.testing.assert_array_equal(after[absent], before[absent].astype("float32"))
    # And each present class moves by Wen et al.'s rule.
    for j in np.unique(ids):
        members = x[ids == j].astype("float64")
        delta = (len(members) * before[j] - members.sum(0)) / (1 + len(members))
        np.testing.assert_allclose(after[j], before[j] - alpha * delta, atol=1e-5)


@SETTINGS
@given(
    size=st.sampled_from([1, 4, 5]),
    steps=st.lists(
        st.tuples(st.sampled_from([1, 3, 8]), NOISE), min_size=1, max_size=6
    ),
)
def test_the_queue_holds_the_last_size_keys_enqueued(size, steps):
    rng = np.random.default_rng(size)
    layer = MemoryQueue(size)
    enqueued = []
    for batch, kind in steps:
        keys = rng.normal(size=(batch, F)).astype("float32")
        layer(keys, training=True)
        enqueued.extend(keys)
        noise(layer, kind, rng, empty_is_skipped=False)
    state = state_snapshot(layer)
    total = len(enqueued)
    for k in range(max(0, total - size), total):
        # Key k of the enqueued stream sits in slot k % size.
        np.testing.assert_array_equal(state["queue"][k % size], enqueued[k])
    assert state["pointer"] == total % size
    assert state["filled"] == min(total, size)


@SETTINGS
@given(
    scales=st.lists(st.sampled_from([1e-3, 1.0, 50.0]), min_size=1, max_size=4),
    between=st.lists(NOISE, min_size=4, max_size=4),
    scheme=st.sampled_from(["affine", "symmetric"]),
    axis=st.sampled_from([None, -1]),
)
def test_fake_quant_output_lies_on_the_grid_of_its_range(scales, between, scheme, axis):
    rng = np.random.default_rng(len(scales))
    layer = FakeQuant(4, scheme=scheme, axis=axis, averaging_constant=0.3)
    trained = 0
    for scale, kind in zip(scales, between, strict=False):
        x = (scale * rng.normal(size=(8, F))).astype("float32")
        out = keras.ops.convert_to_numpy(layer(x, training=True))
        trained += 1
        noise(layer, kind, rng, empty_is_skipped=False)
        step, zero_point = (
            keras.ops.convert_to_numpy(v) for v in layer.quantization_parameters()
        )
        assert np.all(value_of(layer.min_val) <= value_of(layer.max_val))
    assert int(value_of(layer.observations)) == trained
    # The last training output, on the range of its call (the last trained
    # one, which inference and skipped calls did not change).
    levels = out / step + zero_point
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert levels.min() >= layer.quant_min - 1e-3
    assert levels.max() <= layer.quant_max + 1e-3


@SETTINGS
@given(
    steps=st.integers(1, 6),
    decay=st.sampled_from([0.5, 0.9, 0.99]),
    rows=st.sampled_from([3, 8]),
)
def test_vq_cluster_sizes_sum_to_the_batch_size(steps, decay, rows):
    rng = np.random.default_rng(steps)
    layer = VectorQuantizerEMA(all_layers.CODES, F, decay=decay, seed=0)
    for _ in range(steps):
        layer(rng.normal(size=(rows, F)).astype("float32"), training=True)
        # The debiased moving average of a constant count is that count.
        sizes = value_of(layer.ema_cluster_size)
        np.testing.assert_allclose(sizes.sum(), rows, rtol=1e-5)
    assert np.all(np.isfinite(value_of(layer.embeddings)))


@SETTINGS
@given(
    constant=st.floats(-1e6, 1e6, width=32, allow_subnormal=False),
    steps=st.integers(1, 5),
    # Momenta that float32 holds exactly; the others: the test below.
    momentum=st.sampled_from([0.0, 0.5, 0.75, 0.9375]),
)
def test_a_debiased_average_of_a_constant_stream_is_the_constant(
    constant, steps, momentum
):
    layer = MovingAverage(momentum, zero_debias=True)
    x = np.full((3, F), constant, "float32")
    for _ in range(steps):
        layer(x, training=True)
        # (XLA and TensorFlow flush float32 subnormals to zero.)
        np.testing.assert_allclose(value_of(layer.average), x[0], rtol=1e-6, atol=1e-30)


def debiased_cases():
    for name in ("moving_average", "moving_moments", "vector_quantizer_ema"):
        for momentum in (0.9, 0.999, 0.9999):
            yield pytest.param(name, momentum, id=f"{name}-{momentum}")


@pytest.mark.parametrize(("name", "momentum"), debiased_cases())
def test_the_first_debiased_value_is_the_first_batch_value(name, momentum):
    # "hidden / (1 - momentum**counter)": after one step, the batch value.
    x = np.random.default_rng(0).normal(3.0, 1.0, (8, F)).astype("float32")
    if name == "moving_average":
        layer = MovingAverage(momentum, zero_debias=True)
        layer(x, training=True)
        actual, expected = value_of(layer.average), x.mean(0)
    elif name == "moving_moments":
        layer = MovingMoments(momentum=momentum, zero_debias=True)
        layer(x, training=True)
        actual, expected = value_of(layer.moving_mean), x.mean(0)
    else:
        layer = VectorQuantizerEMA(all_layers.CODES, F, decay=momentum, seed=0)
        layer(x, training=True)
        # Every input counts once: the cluster sizes sum to the batch size.
        actual, expected = value_of(layer.ema_cluster_size).sum(), len(x)
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


@SETTINGS
@given(batches=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_the_cumulative_moments_of_equal_batches_are_their_mean(batches, seed):
    rng = np.random.default_rng(seed)
    data = rng.normal(3.0, 2.0, size=(batches, 8, F)).astype("float32")
    layer = MovingMoments(momentum=None)
    for batch in data:
        layer(batch, training=True)
    np.testing.assert_allclose(
        value_of(layer.moving_mean), data.mean((0, 1)), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        value_of(layer.moving_variance), data.var(1).mean(0), rtol=1e-5
    )


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    name=st.sampled_from(sorted(all_layers.LAYERS)),
    row=st.integers(0, 7),
    column=st.integers(0, F - 1),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_a_non_finite_value_anywhere_skips_the_whole_update(name, row, column, value):
    rng = np.random.default_rng(row)
    layer = all_layers.LAYERS[name]()

    def call(x, **kwargs):
        if all_layers.labelled(name):
            labels = rng.integers(0, all_layers.CLASSES, len(x)).astype("int32")
            return layer([x, labels], **kwargs)
        return layer(x, **kwargs)

    call(rng.normal(size=(8, F)).astype("float32"), training=True)
    before = state_snapshot(layer)
    x = rng.normal(size=(8, F)).astype("float32")
    if name in all_layers.STATE_FROM_WEIGHTS:
        # Their state reads the wrapped layer's weights: the value goes there.
        kernel = all_layers.wrapped_kernel(layer)
        poisoned = keras.ops.convert_to_numpy(kernel).copy()
        poisoned[row % poisoned.shape[0], column] = value
        kernel.assign(poisoned)
    else:
        x[row, column] = value
    call(x, training=True)
    after = state_snapshot(layer)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert layer.skipped_updates == 1
