"""MovingMoments and RunningStandardization against their references, and calibrate."""

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_stateful
from backends_test.helpers import value_of
from keras_stateful.layers import MovingMoments, RunningStandardization
from keras_stateful.layers._moments import merge_moments
from keras_stateful.testing import check_state_contract, state_snapshot


def batches_of(rng, count=5, shape=(16, 4), loc=3.0, scale=2.0):
    return [rng.normal(loc, scale, shape).astype("float32") for _ in range(count)]


def numpy_moving_moments(batches, momentum, unbiased, zero_debias, axis=-1):
    """The rule of the docstring in float64 (Keras convention, Haiku debiasing)."""
    mean = variance = None
    hidden_mean = hidden_variance = 0.0
    for t, batch in enumerate(batches, start=1):
        x = np.moveaxis(batch.astype("float64"), axis, -1)
        x = x.reshape(-1, x.shape[-1])
        n = len(x)
        batch_var = x.var(0) * (n / (n - 1) if unbiased else 1.0)
        m = 1 - 1 / t if momentum is None else momentum
        if mean is None:
            mean, variance = np.zeros(x.shape[-1]), np.ones(x.shape[-1])
        if zero_debias:
            hidden_mean = m * hidden_mean + (1 - m) * x.mean(0)
            hidden_variance = m * hidden_variance + (1 - m) * batch_var
            mean = hidden_mean / (1 - m**t)
            variance = hidden_variance / (1 - m**t)
        else:
            mean = m * mean + (1 - m) * x.mean(0)
            variance = m * variance + (1 - m) * batch_var
    return mean, variance


# ---- MovingMoments -----------------------------------------------------------


@pytest.mark.parametrize(
    "momentum, unbiased, zero_debias",
    [
        (0.99, False, False),
        (0.5, True, False),
        (None, False, False),
        (0.9, False, True),
    ],
)
def test_moving_moments_match_numpy(momentum, unbiased, zero_debias, rng):
    batches = batches_of(rng)
    layer = MovingMoments(momentum=momentum, unbiased=unbiased, zero_debias=zero_debias)
    for batch in batches:
        layer(batch, training=True)
    mean, variance = numpy_moving_moments(batches, momentum, unbiased, zero_debias)
    np.testing.assert_allclose(value_of(layer.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(value_of(layer.moving_variance), variance, rtol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_moving_moments_match_torch_batchnorm1d(momentum, rng):
    torch = pytest.importorskip("torch")
    batches = batches_of(rng, shape=(12, 5))
    reference = torch.nn.BatchNorm1d(5, momentum=momentum)
    keras_momentum = None if momentum is None else 1 - momentum
    layer = MovingMoments(momentum=keras_momentum, unbiased=True)
    for batch in batches:
        reference(torch.tensor(batch))
        layer(batch, training=True)
    np.testing.assert_allclose(
        value_of(layer.moving_mean), reference.running_mean.numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(
        value_of(layer.moving_variance), reference.running_var.numpy(), rtol=1e-5
    )


def test_moving_moments_match_keras_batch_normalization(rng):
    batches = batches_of(rng, shape=(8, 3, 4))
    reference = keras.layers.BatchNormalization()
    layer = MovingMoments()
    for batch in batches:
        reference(batch, training=True)
        layer(batch, training=True)
    np.testing.assert_allclose(
        value_of(layer.moving_mean), value_of(reference.moving_mean), rtol=1e-5
    )
    np.testing.assert_allclose(
        value_of(layer.moving_variance), value_of(reference.moving_variance), rtol=1e-5
    )


def test_moving_moments_leave_masked_values_out(rng):
    x = rng.normal(size=(4, 6, 3)).astype("float32")
    mask = np.ones((4, 6), bool)
    mask[:, 4:] = False
    x[:, 4:] = 1e9  # padding must not leak into the statistics
    layer = MovingMoments(momentum=0.0)
    layer(x, training=True, mask=mask)
    kept = x[:, :4].reshape(-1, 3)
    np.testing.assert_allclose(value_of(layer.moving_mean), kept.mean(0), rtol=1e-5)
    np.testing.assert_allclose(value_of(layer.moving_variance), kept.var(0), rtol=1e-4)


def test_moving_moments_skip_a_batch_with_nothing_to_count(rng):
    layer = MovingMoments(momentum=0.0, unbiased=True)
    layer(rng.normal(size=(1, 1, 3)).astype("float32"), training=True)  # n - 1 == 0
    x = rng.normal(size=(2, 5, 3)).astype("float32")
    layer(x, training=True, mask=np.zeros((2, 5), bool))
    assert layer.skipped_updates == 2
    assert state_snapshot(layer)["counter"] == 0
    np.testing.assert_array_equal(value_of(layer.moving_variance), np.ones(3))


def test_moving_moments_per_channel_first_axis(rng):
    batches = batches_of(rng, shape=(4, 3, 5))
    layer = MovingMoments(axis=1, momentum=0.5)
    for batch in batches:
        layer(batch, training=True)
    mean, variance = numpy_moving_moments(batches, 0.5, False, False, axis=1)
    np.testing.assert_allclose(value_of(layer.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(value_of(layer.moving_variance), variance, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, axis",
    [
        ((512, 3), -1),  # features last
        ((16, 3, 4, 5), 1),  # channels first
        ((16, 4, 3, 2), (-2, -1)),  # several trailing feature axes
        ((16, 4, 3, 5), 2),  # a middle axis
    ],
)
def test_moving_moments_keep_the_variance_under_a_large_offset(shape, axis, rng):
    batch = (1e6 + rng.normal(0.0, 1.0, shape)).astype("float32")
    layer = MovingMoments(axis=axis, momentum=0.0)
    layer(batch, training=True)
    axes = (axis,) if isinstance(axis, int) else axis
    kept = [a % len(shape) for a in axes]
    x = np.moveaxis(batch.astype("float64"), kept, range(-len(kept), 0))
    x = x.reshape(-1, *x.shape[len(shape) - len(kept) :])
    np.testing.assert_allclose(value_of(layer.moving_mean), x.mean(0), rtol=1e-7)
    np.testing.assert_allclose(value_of(layer.moving_variance), x.var(0), rtol=1e-4)


def test_moving_moments_bad_arguments_say_what_to_write():
    with pytest.raises(ValueError, match=r"momentum=1\.5.*0\.99"):
        MovingMoments(momentum=1.5)
    with pytest.raises(ValueError, match="drop zero_debias"):
        MovingMoments(momentum=None, zero_debias=True)
    with pytest.raises(ValueError, match=r"axis 0 is the batch"):
        MovingMoments(axis=0).build((None, 3))


@pytest.mark.parametrize("momentum", [0.9, None])
def test_moving_moments_state_contract(momentum, rng):
    x = rng.normal(2.0, 3.0, size=(8, 3)).astype("float32")
    check_state_contract(lambda: MovingMoments(momentum=momentum), x)


# ---- RunningStandardization --------------------------------------------------


def numpy_running(chunks):
    data = np.concatenate(chunks).astype("float64")
    return len(data), data.mean(0), data.var(0)


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 59), max_size=6, unique=True))
def test_any_split_of_a_stream_gives_its_exact_statistics(cuts):
    data = np.random.default_rng(1).normal(5.0, 3.0, (60, 3)).astype("float32")
    chunks = np.split(data, sorted(cuts))
    layer = RunningStandardization()
    for chunk in chunks:
        layer(chunk, training=True)
    count, mean, variance = numpy_running(chunks)
    np.testing.assert_array_equal(value_of(layer.count), np.full(3, count))
    full_mean = value_of(layer.mean) + value_of(layer.mean_correction)
    np.testing.assert_allclose(full_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(value_of(layer.variance), variance, rtol=1e-5)


def test_large_offset_keeps_the_variance(rng):
    data = (1e6 + rng.normal(0.0, 1.0, (2000, 2))).astype("float32")
    layer = RunningStandardization()
    for chunk in np.array_split(data, 9):
        layer(chunk, training=True)
    _, _, variance = numpy_running([data])
    naive = (data**2).mean(0) - data.mean(0) ** 2  # what float32 E[x²]-E[x]² gives
    assert np.all(np.abs(naive - variance) > 1.0)
    np.testing.assert_allclose(value_of(layer.variance), variance, rtol=1e-5)


def numpy_chan_merge(count, mean, variance, batch_count, batch_mean, batch_m2):
    """Chan et al.'s pairwise merge in float64: `(n', mean', variance')`."""
    total = count + batch_count
    delta = batch_mean - mean
    merged_mean = mean + delta * batch_count / total
    m2 = count * variance + batch_m2 + delta**2 * count * batch_count / total
    return total, merged_mean, m2 / total


def as_float32_pair(value):
    """A float64 value as float32 `(high, low)`, high + low close to value."""
    high = value.astype("float32")
    return high, (value - high.astype("float64")).astype("float32")


@pytest.mark.parametrize("offset", [0.0, 1e6])
@pytest.mark.parametrize("seen", [0, 300])
def test_merge_moments_matches_a_numpy_chan_merge(offset, seen, rng):
    """The layer's merge, without a layer: float32 state and batch moments
    (the batch taken around the stored mean, as the layer does) against the
    float64 merge and against the moments of all the data."""
    old = offset + rng.normal(0.0, 1.0, (seen, 3)) * [1.0, 2.0, 0.5]
    new = offset + 0.3 + rng.normal(0.0, 1.0, (70, 3)) * [1.0, 2.0, 0.5]
    count = np.full(3, float(seen))
    mean = old.mean(0) if seen else np.zeros(3)
    variance = old.var(0) if seen else np.ones(3)
    mean_high, mean_low = as_float32_pair(mean)
    # The batch moments as `batch_moments` gives them: around the stored mean,
    # or, before any data, around the batch mean rounded to float32.
    shift = mean_high if seen else new.mean(0).astype("float32")
    offset_of_mean = (new.mean(0) - shift).astype("float32")
    m2 = ((new - new.mean(0)) ** 2).sum(0)

    state = [count, mean_high, mean_low, variance, np.full(3, 70.0), shift]
    state += [offset_of_mean, m2]
    tensors = [keras.ops.convert_to_tensor(np.float32(v), "float32") for v in state]
    merged = [
        np.asarray(keras.ops.convert_to_numpy(t)) for t in merge_moments(*tensors)
    ]
    total, merged_high, merged_low, merged_variance = merged

    expected = numpy_chan_merge(seen, mean, variance, 70, new.mean(0), m2)
    everything = np.concatenate([old, new])
    np.testing.assert_allclose(expected[1:], [everything.mean(0), everything.var(0)])
    np.testing.assert_array_equal(total, np.full(3, seen + 70.0))
    merged_mean = merged_high.astype("float64") + merged_low
    # float32 alone holds a mean near 1e6 to 0.03; the pair to about 1e-6.
    np.testing.assert_allclose(merged_mean, expected[1], rtol=0, atol=2e-6)
    np.testing.assert_allclose(merged_variance, expected[2], rtol=2e-6)
    if offset:
        assert np.max(np.abs(merged_high - expected[1])) > 1e-3


def test_standardises_with_the_batch_in_training_and_stored_in_inference(rng):
    first, second = batches_of(rng, count=2, shape=(32, 3))
    layer = RunningStandardization(epsilon=0.0)
    out = keras.ops.convert_to_numpy(layer(first, training=True))
    np.testing.assert_allclose(out, (first - first.mean(0)) / first.std(0), atol=1e-4)
    out = keras.ops.convert_to_numpy(layer(second, training=False))
    np.testing.assert_allclose(out, (second - first.mean(0)) / first.std(0), atol=1e-4)
    assert value_of(layer.count)[0] == 32


def test_clip_bounds_the_output(rng):
    layer = RunningStandardization(clip=0.5)
    out = keras.ops.convert_to_numpy(layer(batches_of(rng, 1)[0], training=True))
    assert out.max() <= 0.5 and out.min() >= -0.5


def test_first_layer_of_a_model_fed_raw_features(rng):
    x = (100.0 + 10.0 * rng.normal(size=(64, 3))).astype("float32")
    model = keras.Sequential(
        [keras.Input((3,)), RunningStandardization(name="std"), keras.layers.Dense(1)]
    )
    model.compile("sgd", "mse")
    model.fit(x, np.zeros((64, 1)), batch_size=16, epochs=2, verbose=0)
    layer = model.get_layer("std")
    _, mean, variance = numpy_running([x, x])
    np.testing.assert_allclose(value_of(layer.count), np.full(3, 128.0))
    np.testing.assert_allclose(value_of(layer.mean), mean, rtol=1e-5)
    np.testing.assert_allclose(value_of(layer.variance), variance, rtol=1e-4)


def test_mixed_precision_output_in_compute_dtype(rng):
    keras.config.set_dtype_policy("mixed_float16")
    layer = RunningStandardization()
    out = layer(batches_of(rng, 1)[0], training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    assert value_of(layer.variance).dtype == np.float32


def test_running_standardization_state_contract(rng):
    x = rng.normal(2.0, 3.0, size=(8, 2, 3)).astype("float32")
    check_state_contract(lambda: RunningStandardization(clip=5.0), x)


def test_running_standardization_bad_arguments_say_what_to_write():
    with pytest.raises(ValueError, match=r"clip=10\.0"):
        RunningStandardization(clip=-1.0)
    with pytest.raises(ValueError, match="known size"):
        RunningStandardization().build((None, None))


# ---- calibrate ---------------------------------------------------------------


def test_calibrate_recomputes_statistics_like_update_bn(rng):
    x = rng.normal(1.0, 2.0, (96, 4)).astype("float32")
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4, name="dense")(inputs)
    moments = MovingMoments(momentum=0.99, name="moments")
    standard = RunningStandardization(name="standard")
    model = keras.Model(inputs, standard(moments(hidden)))
    model.compile("sgd", "mse")
    model.fit(x, np.zeros((96, 4)), batch_size=32, verbose=0)
    weights = [value_of(w) for w in model.trainable_weights]
    moments.freeze_state()

    layers = keras_stateful.calibrate(model, x, batch_size=32)

    assert {layer.name for layer in layers} == {"moments", "standard"}
    assert moments.state_frozen and moments.momentum == 0.99  # restored
    for before, after in zip(weights, model.trainable_weights, strict=True):
        np.testing.assert_array_equal(before, value_of(after))
    features = keras.ops.convert_to_numpy(model.get_layer("dense")(x)).astype("float64")
    batch_means = features.reshape(3, 32, 4).mean(1)
    np.testing.assert_allclose(
        value_of(moments.moving_mean), batch_means.mean(0), rtol=1e-5
    )
    np.testing.assert_allclose(value_of(standard.variance), features.var(0), rtol=1e-4)
    assert value_of(standard.count)[0] == 96


def test_calibrate_takes_batches_of_inputs_and_targets(rng):
    x = rng.normal(size=(20, 3)).astype("float32")
    layer = RunningStandardization()
    model = keras.Sequential([keras.Input((3,)), layer])
    keras_stateful.calibrate(model, [(x[:10], x[:10]), (x[10:], x[10:])])
    assert value_of(layer.count)[0] == 20
    keras_stateful.calibrate(model, x, batch_size=8, steps=1)
    assert value_of(layer.count)[0] == 8
    with pytest.raises(TypeError, match="calibrate"):
        keras_stateful.calibrate(model, 3)
