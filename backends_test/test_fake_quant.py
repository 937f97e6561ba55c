"""FakeQuant against PyTorch's FakeQuantize and a NumPy re-implementation."""

import keras
import numpy as np
import pytest

from backends_test.helpers import value_of
from backends_test.test_stateful_layer import input_gradient
from keras_stateful.layers.fake_quant import FakeQuant
from keras_stateful.testing import check_state_contract, state_snapshot

EPS = np.float32(2.0**-23)  # torch.finfo(torch.float32).eps

CASES = [
    # (num_bits, scheme, axis)
    (8, "affine", None),
    (8, "symmetric", None),
    (8, "affine", -1),
    (8, "symmetric", 1),
    (4, "affine", None),
    (4, "symmetric", -1),
]


def default_range(num_bits, scheme):
    if scheme == "affine":
        return 0, 2**num_bits - 1
    return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1


def numpy_fake_quant(batches, num_bits, scheme, axis, c):
    """PyTorch's FakeQuantize(MovingAverage[PerChannel]MinMaxObserver), float32."""
    qmin, qmax = default_range(num_bits, scheme)
    c = np.float32(c)
    min_val = max_val = None
    outputs = []
    for batch in batches:
        x = batch.astype("float32")
        if axis is None:
            reduce = None
        else:
            reduce = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        batch_min, batch_max = x.min(axis=reduce), x.max(axis=reduce)
        if min_val is None:
            min_val, max_val = batch_min, batch_max
        else:
            min_val = min_val + c * (batch_min - min_val)
            max_val = max_val + c * (batch_max - max_val)
        scale, zero_point = numpy_qparams(min_val, max_val, qmin, qmax, scheme)
        shape = [1] * x.ndim
        if axis is not None:
            shape[axis] = -1
        s, z = scale.reshape(shape), zero_point.reshape(shape).astype("float32")
        q = np.round(x * (np.float32(1) / s)) + z  # np.round: half to even
        outputs.append(((np.clip(q, qmin, qmax) - z) * s).astype("float32"))
    return outputs, min_val, max_val, scale, zero_point


def numpy_qparams(min_val, max_val, qmin, qmax, scheme):
    min_neg = np.minimum(min_val, np.float32(0))
    max_pos = np.maximum(max_val, np.float32(0))
    if scheme == "symmetric":
        scale = np.maximum(max_pos, -min_neg) / np.float32((qmax - qmin) / 2)
        scale = np.maximum(scale, EPS)
        return scale, np.zeros(np.shape(scale), "int32")
    scale = np.maximum((max_pos - min_neg) / np.float32(qmax - qmin), EPS)
    zero_point = np.clip(qmin - np.round(min_neg / scale), qmin, qmax)
    return scale, zero_point.astype("int32")


def drifting_batches(rng, shape=(6, 4, 3), count=5):
    """Batches whose range drifts, with per-channel offsets and signs."""
    offsets = np.array([0.5, -2.0, 3.0])[: shape[-1]]
    return [
        (rng.normal(size=shape) * (1 + 0.3 * i) + offsets + 0.2 * i).astype("float32")
        for i in range(count)
    ]


def run_layer(layer, batches):
    outputs = [value_of(layer(b, training=True)) for b in batches]
    scale, zero_point = layer.quantization_parameters()
    return outputs, value_of(scale), value_of(zero_point)


@pytest.mark.parametrize("num_bits, scheme, axis", CASES)
def test_matches_numpy_reference(num_bits, scheme, axis, rng):
    batches = drifting_batches(rng)
    layer = FakeQuant(num_bits, scheme=scheme, axis=axis, averaging_constant=0.3)
    outputs, scale, zero_point = run_layer(layer, batches)
    expected = numpy_fake_quant(batches, num_bits, scheme, axis, 0.3)
    np.testing.assert_array_equal(value_of(layer.min_val), expected[1])
    np.testing.assert_array_equal(value_of(layer.max_val), expected[2])
    np.testing.assert_array_equal(scale, expected[3])
    np.testing.assert_array_equal(zero_point, expected[4])
    for out, reference in zip(outputs, expected[0], strict=True):
        np.testing.assert_array_equal(out, reference)
    assert state_snapshot(layer)["observations"] == len(batches)


@pytest.mark.parametrize("num_bits, scheme, axis", CASES)
def test_matches_torch_fake_quantize(num_bits, scheme, axis, rng):
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )

    batches = drifting_batches(rng)
    qmin, qmax = default_range(num_bits, scheme)
    per_channel = axis is not None
    qscheme = {
        (False, "affine"): torch.per_tensor_affine,
        (False, "symmetric"): torch.per_tensor_symmetric,
        (True, "affine"): torch.per_channel_affine,
        (True, "symmetric"): torch.per_channel_symmetric,
    }[per_channel, scheme]
    kwargs = {"ch_axis": axis % batches[0].ndim} if per_channel else {}
    fake_quant = FakeQuantize(
        observer=(
            MovingAveragePerChannelMinMaxObserver
            if per_channel
            else MovingAverageMinMaxObserver
        ),
        quant_min=qmin,
        quant_max=qmax,
        dtype=torch.quint8 if scheme == "affine" else torch.qint8,
        qscheme=qscheme,
        averaging_constant=0.3,
        **kwargs,
    )
    with torch.no_grad():
        torch_outputs = [fake_quant(torch.from_numpy(b)).numpy() for b in batches]
    observer = fake_quant.activation_post_process
    torch_scale, torch_zero_point = (t.numpy() for t in fake_quant.calculate_qparams())

    layer = FakeQuant(num_bits, scheme=scheme, axis=axis, averaging_constant=0.3)
    outputs, scale, zero_point = run_layer(layer, batches)
    np.testing.assert_array_equal(value_of(layer.min_val), observer.min_val.numpy())
    np.testing.assert_array_equal(value_of(layer.max_val), observer.max_val.numpy())
    np.testing.assert_array_equal(scale.reshape(-1), torch_scale)
    np.testing.assert_array_equal(zero_point.reshape(-1), torch_zero_point)
    for out, reference in zip(outputs, torch_outputs, strict=True):
        np.testing.assert_array_equal(out, reference)


@pytest.mark.parametrize("scheme, axis", [("affine", -1), ("symmetric", None)])
def test_compiled_predict_quantizes_as_eager_calls(scheme, axis, rng):
    """XLA must not turn the qparams divisions into reciprocal products."""
    batches = drifting_batches(rng, shape=(8, 3), count=2)
    layer = FakeQuant(scheme=scheme, axis=axis, averaging_constant=0.3)
    for batch in batches:
        layer(batch, training=True)
    model = keras.Sequential([keras.Input((3,)), layer])
    x = rng.normal(scale=3.0, size=(64, 3)).astype("float32")
    np.testing.assert_array_equal(
        model.predict(x, batch_size=64, verbose=0), value_of(layer(x))
    )
    scale, zero_point = layer.quantization_parameters()
    expected = numpy_fake_quant(batches, 8, scheme, axis, 0.3)
    np.testing.assert_array_equal(value_of(scale), expected[3])
    np.testing.assert_array_equal(value_of(zero_point), expected[4])


def test_first_batch_sets_the_range_and_later_ones_move_it():
    layer = FakeQuant(averaging_constant=0.25)
    layer(np.array([[-1.0, 0.3, 2.0]], "float32"), training=True)
    assert value_of(layer.min_val) == -1.0 and value_of(layer.max_val) == 2.0
    scale, zero_point = layer.quantization_parameters()
    np.testing.assert_allclose(value_of(scale), 3.0 / 255, rtol=1e-7)
    assert value_of(zero_point) == 85
    layer(np.array([[-5.0, 6.0]], "float32"), training=True)
    assert value_of(layer.min_val) == -2.0 and value_of(layer.max_val) == 3.0


def test_training_quantizes_with_the_range_including_the_batch():
    x = np.array([[0.0, 10.0]], "float32")
    layer = FakeQuant()
    layer(np.array([[0.0, 1.0]], "float32"), training=True)
    out = value_of(layer(x, training=True))
    # max moved to 1 + 0.01 * (10 - 1) = 1.09: 10 is clipped there, not at 1.
    np.testing.assert_allclose(out[0, 1], 1.09, rtol=1e-6)


def test_inference_uses_the_stored_range_and_does_not_update(rng):
    layer = FakeQuant()
    layer(np.array([[0.0, 1.0]], "float32"), training=True)
    before = state_snapshot(layer)
    x = np.array([[0.2, 7.0, -3.0]], "float32")
    out = value_of(layer(x, training=False))
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, before[name])
    # scale 1/255, zero point 0: 7 and -3 clip to the stored [0, 1].
    np.testing.assert_allclose(out, [[51 / 255, 1.0, 0.0]], rtol=1e-6)
    layer.freeze_state()
    frozen = value_of(layer(x, training=True))
    np.testing.assert_array_equal(frozen, out)
    assert state_snapshot(layer)["observations"] == 1


def test_before_any_observation_the_input_passes_through(rng):
    x = rng.normal(scale=3.0, size=(4, 5)).astype("float32")
    layer = FakeQuant()
    np.testing.assert_array_equal(value_of(layer(x, training=False)), x)
    scale, zero_point = layer.quantization_parameters()
    assert value_of(scale) == 1.0 and value_of(zero_point) == 0
    assert value_of(zero_point).dtype == np.int32
    assert state_snapshot(layer)["observations"] == 0


def test_gradient_is_straight_through_inside_the_range_and_zero_outside():
    layer = FakeQuant(scheme="affine")
    layer(np.array([[-1.0, 1.0]], "float32"), training=True)
    # The range moves to [-1.04, 1.04]: 5 and -5 lie outside it.
    x = np.array([[0.5, -0.3, 5.0, -5.0]], "float32")
    grad = input_gradient(layer, x)
    np.testing.assert_array_equal(grad, [[1.0, 1.0, 0.0, 0.0]])
    assert state_snapshot(layer)["observations"] == 2


def test_symmetric_largest_value_is_clipped_as_in_torch():
    """3 * (1 / scale) is 127.5, rounded half to even to 128 > 127: clipped.

    PyTorch gives the same output and gradient [1, 1, 0] (for max 2.0 the
    product is 127.49999 and it stays inside).
    """
    layer = FakeQuant(scheme="symmetric")
    layer.build((None, 3))
    x = np.array([[-1.0, 0.5, 3.0]], "float32")
    grad = input_gradient(layer, x)
    np.testing.assert_array_equal(grad, [[1.0, 1.0, 0.0]])
    out = value_of(layer(x))
    np.testing.assert_allclose(out, [[-0.9882353, 0.49411765, 2.9882352]], rtol=1e-6)


def test_per_channel_ranges(rng):
    x = np.stack([rng.uniform(-1, 1, 8), rng.uniform(0, 4, 8)], axis=-1)
    layer = FakeQuant(axis=-1)
    layer(x.astype("float32"), training=True)
    assert value_of(layer.min_val).shape == (2,)
    np.testing.assert_array_equal(value_of(layer.max_val), x.max(0).astype("float32"))
    _, zero_point = layer.quantization_parameters()
    assert value_of(zero_point)[1] == 0 and value_of(zero_point)[0] > 100


def test_custom_quant_range_narrow_symmetric():
    layer = FakeQuant(scheme="symmetric", quant_min=-127, quant_max=127)
    out = value_of(layer(np.array([[-2.0, 0.5, 2.0]], "float32"), training=True))
    # scale 2 / 127: 0.5 is 31.75 steps, rounded to 32; -2 and 2 are +-127 steps.
    np.testing.assert_allclose(out, [[-2.0, 32 * 2 / 127, 2.0]], rtol=1e-6)
    scale, zero_point = layer.quantization_parameters()
    np.testing.assert_allclose(value_of(scale), 2 / 127, rtol=1e-7)
    assert value_of(zero_point) == 0


def test_mixed_precision_output_dtype_and_float32_state(rng):
    x = rng.normal(size=(4, 3)).astype("float32")
    for policy in ("mixed_float16", "mixed_bfloat16"):
        keras.config.set_dtype_policy(policy)
        layer = FakeQuant(axis=-1)
        out = layer(x, training=True)
        assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
        assert layer.min_val.dtype == "float32" and layer.observations.dtype == "int32"
        np.testing.assert_allclose(value_of(layer.max_val), x.max(0), rtol=1e-2)


def test_config_round_trip():
    layer = FakeQuant(4, scheme="symmetric", axis=1, averaging_constant=0.1)
    clone = FakeQuant.from_config(layer.get_config())
    assert (clone.num_bits, clone.scheme, clone.axis) == (4, "symmetric", 1)
    assert (clone.quant_min, clone.quant_max) == (-8, 7)
    assert clone.averaging_constant == 0.1


def test_bad_arguments_are_refused():
    for num_bits in (1, 17, 8.0, True):
        with pytest.raises(
            ValueError, match=r"num_bits must be an integer in \[2, 16\]"
        ):
            FakeQuant(num_bits)
    with pytest.raises(ValueError, match=r"scheme='per_tensor'.*'symmetric'"):
        FakeQuant(scheme="per_tensor")
    with pytest.raises(ValueError, match=r"averaging_constant=1\.5.*0\.01"):
        FakeQuant(averaging_constant=1.5)
    with pytest.raises(TypeError, match=r"axis=\(1, 2\)"):
        FakeQuant(axis=(1, 2))
    with pytest.raises(ValueError, match="together"):
        FakeQuant(quant_min=0)
    with pytest.raises(ValueError, match=r"at most 2\*\*num_bits = 16.*quant_max=255"):
        FakeQuant(4, quant_min=0, quant_max=255)
    with pytest.raises(ValueError, match="must contain 0"):
        FakeQuant(quant_min=1, quant_max=255)


def test_bad_shapes_are_refused(rng):
    with pytest.raises(
        ValueError, match=r"axis=3 is out of range for inputs of rank 3"
    ):
        FakeQuant(axis=3).build((None, 4, 2))
    with pytest.raises(ValueError, match=r"channel axis 0 .* unknown size"):
        FakeQuant(axis=0).build((None, 4))
    layer = FakeQuant(axis=-1)
    layer.build((None, 3))
    with pytest.raises(ValueError, match=r"expected axis 1 .* value 3"):
        layer(rng.normal(size=(2, 4)).astype("float32"))


@pytest.mark.parametrize("axis", [None, -1])
def test_state_contract(axis, rng):
    x = rng.normal(size=(8, 2, 3)).astype("float32")
    check_state_contract(lambda: FakeQuant(axis=axis, averaging_constant=0.3), x)
