"""PercentileNormalization against a NumPy re-implementation of DreamerV3's rule.

The reference takes `numpy.percentile` (linear interpolation) over the flattened
batch, moves `lo` and `hi` by `rate`, zero-debiases as Haiku's
`ExponentialMovingAverage` does, and normalises with the updated `lo` and `hi`.
"""

import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from backends_test.helpers import BACKEND, value_of
from keras_stateful.layers import PercentileNormalization
from keras_stateful.layers.percentile_normalization import percentiles
from keras_stateful.testing import check_state_contract, state_snapshot


class NumpyPercentileNormalization:
    def __init__(self, rate=0.01, limit=1.0, low=5, high=95, debias=False):
        self.rate, self.limit, self.low, self.high = rate, limit, low, high
        self.debias = debias
        self.lo = self.hi = self.lo_hidden = self.hi_hidden = 0.0
        self.counter = 0

    def step(self, x):
        flat = np.asarray(x, "float64").ravel()
        p_lo, p_hi = np.percentile(flat, self.low), np.percentile(flat, self.high)
        if not self.debias:
            self.lo = (1 - self.rate) * self.lo + self.rate * p_lo
            self.hi = (1 - self.rate) * self.hi + self.rate * p_hi
            return
        # Haiku: hidden -= (hidden - value) * (1 - decay); average = hidden /
        # (1 - decay ** counter).
        decay = 1 - self.rate
        self.counter += 1
        self.lo_hidden -= (self.lo_hidden - p_lo) * (1 - decay)
        self.hi_hidden -= (self.hi_hidden - p_hi) * (1 - decay)
        self.lo = self.lo_hidden / (1 - decay**self.counter)
        self.hi = self.hi_hidden / (1 - decay**self.counter)

    def normalize(self, x, scale_only=False):
        scale = max(self.limit, self.hi - self.lo)
        return (x if scale_only else x - self.lo) / scale


def returns_batches(rng, shape=(8, 5), steps=5):
    # Shifting, widening returns, with ties (rounded) and outliers.
    batches = []
    for step in range(steps):
        x = np.round(rng.normal(10.0 * step, 1.0 + 3.0 * step, size=shape), 1)
        x.flat[0] = 500.0 * (step + 1)
        batches.append(x.astype("float32"))
    return batches


CASES = {
    "defaults": {},
    "debias": {"debias": True},
    "scale_only": {"scale_only": True},
    "fast_debias_small_limit": {"rate": 0.3, "limit": 1e-3, "debias": True},
    "whole_range": {"rate": 0.5, "low": 0, "high": 100},
    "rate_one_median_band": {"rate": 1.0, "low": 49.5, "high": 50.5},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_rule_over_steps(case, rng):
    kwargs = CASES[case]
    scale_only = kwargs.get("scale_only", False)
    layer = PercentileNormalization(**kwargs)
    reference = NumpyPercentileNormalization(
        **{k: v for k, v in kwargs.items() if k != "scale_only"}
    )
    for x in returns_batches(rng):
        out = layer(x, training=True)
        reference.step(x)
        state = state_snapshot(layer)
        np.testing.assert_allclose(state["lo"], reference.lo, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state["hi"], reference.hi, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            value_of(out), reference.normalize(x, scale_only), rtol=1e-5, atol=1e-5
        )
    if kwargs.get("debias"):
        assert int(state["counter"]) == 5
        np.testing.assert_allclose(state["lo_hidden"], reference.lo_hidden, rtol=1e-5)


def test_first_debiased_update_is_the_batch_percentile(rng):
    x = rng.normal(size=(4, 6)).astype("float32")
    layer = PercentileNormalization(debias=True)
    layer(x, training=True)
    np.testing.assert_allclose(value_of(layer.lo), np.percentile(x, 5), rtol=1e-5)
    np.testing.assert_allclose(value_of(layer.hi), np.percentile(x, 95), rtol=1e-5)


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (3, 4), (2, 3, 5), (101,)])
def test_percentiles_match_numpy_linear_interpolation(shape, rng):
    x = rng.normal(size=shape).astype("float32")
    qs = (0.0, 5.0, 12.5, 50.0, 95.0, 99.9, 100.0)
    got = percentiles(ops.reshape(ops.convert_to_tensor(x), (-1,)), None, qs)
    np.testing.assert_allclose(
        [float(value_of(g)) for g in got],
        np.percentile(x.astype("float64"), qs),
        rtol=1e-6,
        atol=1e-6,
    )


def test_percentiles_ignore_padding_rows(rng):
    """The data-parallel path: padded rows of uneven replicas are left out."""
    real = rng.normal(size=(7,)).astype("float32")
    padded = np.concatenate([real[:4], [0.0, 0.0], real[4:], [0.0]]).astype("float32")
    valid = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    got = percentiles(
        ops.convert_to_tensor(padded), ops.convert_to_tensor(valid), (5.0, 95.0)
    )
    np.testing.assert_allclose(
        [float(value_of(g)) for g in got], np.percentile(real, [5, 95]), rtol=1e-6
    )


def test_inference_uses_the_stored_range_and_moves_nothing(rng):
    layer = PercentileNormalization(rate=0.5)
    x = (rng.normal(size=(6, 4)) * 10).astype("float32")
    layer(x, training=True)
    before = state_snapshot(layer)
    lo, hi = float(before["lo"]), float(before["hi"])
    for training in (False, None):
        out = layer(2 * x, training=training)
        np.testing.assert_allclose(
            value_of(out), (2 * x - lo) / max(1.0, hi - lo), rtol=1e-6
        )
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, before[name])


def test_spread_below_limit_is_not_blown_up():
    layer = PercentileNormalization(rate=1.0, limit=1.0)
    x = np.array([0.1, 0.2, 0.3, 0.4], "float32")
    out = value_of(layer(x, training=True))
    lo = np.percentile(x, 5)
    np.testing.assert_allclose(out, x - lo, rtol=1e-6)  # divided by limit = 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_batch_is_skipped_and_counted(bad, rng):
    layer = PercentileNormalization(rate=0.5)
    x = rng.normal(size=(4, 3)).astype("float32")
    layer(x, training=True)
    before = state_snapshot(layer)
    x[2, 1] = bad
    layer(x, training=True)
    assert layer.skipped_updates == 1
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, before[name])


def test_empty_batch_moves_nothing(rng):
    layer = PercentileNormalization(rate=0.5, debias=True)
    layer(rng.normal(size=(3, 2)).astype("float32"), training=True)
    before = state_snapshot(layer)
    out = layer(np.zeros((0, 2), "float32"), training=True)
    assert tuple(out.shape) == (0, 2)
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, before[name])
    assert layer.skipped_updates == 0


def test_gradient_is_one_over_the_scale(rng):
    layer = PercentileNormalization(rate=1.0, limit=0.1)
    x = (rng.normal(size=(16,)) * 5).astype("float32")
    layer(x, training=True)
    scale = max(0.1, float(value_of(layer.hi)) - float(value_of(layer.lo)))
    grad = keras_gradient(lambda v: ops.sum(layer(v, training=False)), x)
    np.testing.assert_allclose(grad, np.full_like(x, 1.0 / scale), rtol=1e-5)


def keras_gradient(function, x):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(function)(x))
    if backend == "tensorflow":
        import tensorflow as tf

        v = tf.Variable(x)
        with tf.GradientTape() as tape:
            y = function(v)
        return tape.gradient(y, v).numpy()
    import torch

    v = torch.tensor(x, requires_grad=True)
    function(v).backward()
    return v.grad.numpy()


def test_compiled_fit_matches_numpy(rng):
    """A jit-compiled fit step (the sort inside XLA/tf.function) on the rule."""
    x = returns_batches(rng, shape=(12, 4), steps=3)
    data = np.concatenate(x)
    layer = PercentileNormalization(rate=0.2, debias=True)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    model.fit(data, np.zeros_like(data), batch_size=12, shuffle=False, verbose=0)
    reference = NumpyPercentileNormalization(rate=0.2, debias=True)
    for batch in x:
        reference.step(batch)
    np.testing.assert_allclose(value_of(layer.lo), reference.lo, rtol=1e-5)
    np.testing.assert_allclose(value_of(layer.hi), reference.hi, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rate": 0.0}, r"rate must be in \(0, 1\].*received rate=0.0"),
        ({"rate": True}, r"rate must be in \(0, 1\].*received rate=True"),
        ({"debias": "yes"}, r"debias must be True or False; received debias='yes'"),
        ({"rate": 1.5}, r"rate must be in \(0, 1\].*rate=0.01"),
        ({"limit": 0.0}, r"limit must be > 0.*received limit=0.0"),
        ({"low": -1}, r"low must be in \[0, 100\].*received low=-1"),
        ({"high": 101}, r"high must be in \[0, 100\].*received high=101"),
        ({"low": 95, "high": 5}, r"low must be below high.*low=95, high=5"),
        ({"low": 50, "high": 50}, r"low must be below high"),
    ],
)
def test_bad_arguments_say_what_to_write(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PercentileNormalization(**kwargs)


def test_integer_inputs_are_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"floats; received dtype int32.*ops.cast"):
        PercentileNormalization()(np.arange(6, dtype="int32"), training=True)


def test_config_round_trip():
    layer = PercentileNormalization(
        0.05, 2.0, low=10, high=90, debias=True, scale_only=True, name="norm"
    )
    config = layer.get_config()
    assert {k: config[k] for k in ("rate", "limit", "low", "high")} == {
        "rate": 0.05,
        "limit": 2.0,
        "low": 10.0,
        "high": 90.0,
    }
    clone = PercentileNormalization.from_config(config)
    assert clone.debias and clone.scale_only and clone.name == "norm"


@pytest.mark.parametrize("debias", [False, True], ids=["plain", "debias"])
def test_state_contract(debias, rng):
    x = (rng.normal(size=(8, 5)) * 4 + 3).astype("float32")
    check_state_contract(lambda: PercentileNormalization(rate=0.3, debias=debias), x)


def test_policy_gradient_example_learns(tmp_path):
    """examples/percentile_returns.py: REINFORCE on normalised returns improves."""
    root = pathlib.Path(__file__).resolve().parent.parent
    script = root / "examples" / "percentile_returns.py"
    result = subprocess.run(
        [sys.executable, str(script), "--iterations=15"],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "KERAS_BACKEND": BACKEND,
            "PYTHONPATH": os.pathsep.join(
                [str(root), os.environ.get("PYTHONPATH", "")]
            ),
        },
        timeout=300,
        check=True,
    )
    assert f"backend: {BACKEND}" in result.stdout
    first = float(
        re.search(r"iteration   0  mean episode return +(\S+)", result.stdout)[1]
    )
    final = float(re.search(r"final mean episode return (\S+)", result.stdout)[1])
    assert first < 100 and final > 400, result.stdout


def test_guide_examples_run_and_do_what_they_say(rng):
    root = pathlib.Path(__file__).resolve().parent.parent
    guide = (root / "docs" / "return-normalization.md").read_text()
    first, loss_layer = re.findall(r"```python\n(.*?)```", guide, re.S)
    namespace = {}
    exec(compile(first, "return-normalization.md", "exec"), namespace)
    returns = namespace["returns"]
    np.testing.assert_allclose(namespace["lo"], np.percentile(returns, 5), rtol=1e-5)
    np.testing.assert_allclose(namespace["hi"], np.percentile(returns, 95), rtol=1e-5)
    np.testing.assert_allclose(
        value_of(namespace["evaluation"]), value_of(namespace["scaled"]), rtol=1e-6
    )
    # The loss layer: -log pi(a) * (normalised return - its batch mean).
    exec(compile(loss_layer, "return-normalization.md", "exec"), namespace)
    logits = rng.normal(size=(6, 2)).astype("float32")
    actions = np.array([0, 1, 1, 0, 1, 0], "int32")
    normalized = rng.normal(size=(6, 1)).astype("float32")
    got = namespace["PolicyGradientLoss"]()(logits, actions, normalized)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -log_probs[np.arange(6), actions] * (
        normalized[:, 0] - normalized.mean()
    )
    np.testing.assert_allclose(value_of(got), expected, rtol=1e-5, atol=1e-6)
