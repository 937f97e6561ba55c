"""SyncBatchNormalization on one device: `keras.layers.BatchNormalization`'s
outputs, gradients and moving statistics within 1e-6 (the data-parallel
runs are in test_sync_batch_normalization_distributed.py)."""

import pathlib
import re

import keras
import numpy as np
import pytest

from backends_test.helpers import BACKEND, value_of
from keras_stateful.layers import SyncBatchNormalization
from keras_stateful.testing import check_state_contract


def step_with_gradients(layer, x, r, mask=None, training=True):
    """`(outputs, d/dx, [d/d trainable])` of `sum(outputs * r)`, state updated."""
    kwargs = {"training": training}
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        if not layer.built:
            layer.build(x.shape)
        non_trainable = [v.value for v in layer.non_trainable_variables]
        if mask is not None:
            kwargs["mask"] = jnp.asarray(mask)

        def loss(x, trainable):
            out, state = layer.stateless_call(trainable, non_trainable, x, **kwargs)
            return jnp.sum(out * r), (out, state)

        trainable = [v.value for v in layer.trainable_variables]
        (_, (out, state)), (dx, grads) = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True
        )(jnp.asarray(x), trainable)
        for variable, value in zip(layer.non_trainable_variables, state, strict=True):
            variable.assign(value)
        return value_of(out), np.asarray(dx), [np.asarray(g) for g in grads]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        if mask is not None:
            kwargs["mask"] = tf.constant(mask)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, **kwargs)
            loss = tf.reduce_sum(out * r)
        dx, *grads = tape.gradient(loss, [x, *layer.trainable_variables])
        return out.numpy(), dx.numpy(), [g.numpy() for g in grads]
    import torch

    x = torch.tensor(x, requires_grad=True)
    if mask is not None:
        kwargs["mask"] = torch.tensor(mask)
    out = layer(x, **kwargs)
    loss = torch.sum(out * torch.tensor(r))
    dx, *grads = torch.autograd.grad(
        loss, [x, *(v.value for v in layer.trainable_variables)]
    )
    return out.detach().numpy(), dx.numpy(), [g.numpy() for g in grads]


def pair(**kwargs):
    """Ours and Keras's, with the same random gamma and beta."""
    init = {
        "gamma_initializer": keras.initializers.RandomNormal(1.0, 0.3, seed=1),
        "beta_initializer": keras.initializers.RandomNormal(0.0, 0.3, seed=2),
    }
    return (
        SyncBatchNormalization(**init, **kwargs),
        keras.layers.BatchNormalization(**init, **kwargs),
    )


def assert_same(ours, theirs, label, atol=1e-6):
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=atol, err_msg=label)


CASES = {
    "rank 2": ((8, 3), {}),
    "rank 4, channels last": ((4, 5, 5, 3), {"momentum": 0.9}),
    "rank 4, axis 1": ((4, 3, 5, 5), {"axis": 1, "epsilon": 1e-5}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_device_equals_keras_batch_normalization(case, rng):
    shape, kwargs = CASES[case]
    ours, keras_bn = pair(**kwargs)
    offset, atol = 2.0, 1e-6
    for step in range(4):
        x = rng.normal(offset, 3.0, size=shape).astype("float32")
        r = rng.normal(size=shape).astype("float32")
        got = step_with_gradients(ours, x, r)
        want = step_with_gradients(keras_bn, x, r)
        assert_same(got[0], want[0], f"step {step}: outputs", atol)
        assert_same(got[1], want[1], f"step {step}: input gradient", atol)
        for name, g, w in zip(("gamma", "beta"), got[2], want[2], strict=True):
            assert_same(g, w, f"step {step}: {name} gradient", atol)
        assert_same(
            value_of(ours.moving_mean), value_of(keras_bn.moving_mean), "moving_mean"
        )
        assert_same(
            value_of(ours.moving_variance),
            value_of(keras_bn.moving_variance),
            "moving_variance",
        )
    x = rng.normal(offset, 3.0, size=shape).astype("float32")
    assert_same(value_of(ours(x)), value_of(keras_bn(x)), "inference outputs", atol)


@pytest.mark.skipif(BACKEND != "torch", reason="autograd's saved tensors are PyTorch's")
@pytest.mark.parametrize("training", ["bool", "tensor", "inference"])
@pytest.mark.parametrize("mask", [False, True])
def test_backward_saves_no_state_so_no_read_needs_protecting(training, mask, rng):
    """The layer skips the backward-safety hook: nothing it saves is state."""
    import torch

    layer = SyncBatchNormalization(momentum=0.9)
    x = torch.tensor(rng.normal(2.0, 3.0, (8, 3)).astype("float32"), requires_grad=True)
    layer.build(tuple(x.shape))
    state = {
        v.value.untyped_storage().data_ptr() for v in layer.non_trainable_variables
    }
    saved = []

    def pack(tensor):
        saved.append(tensor.untyped_storage().data_ptr())
        return tensor

    flags = {"bool": True, "tensor": torch.tensor(True), "inference": False}
    kwargs = {"training": flags[training]}
    if mask:
        kwargs["mask"] = torch.tensor(rng.random(8) > 0.3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x, **kwargs)
    assert saved and not state & set(saved)
    out.sum().backward()  # after the in-place commit, if any
    assert layer._state_reads_need_protection is False


def test_large_offset_keeps_the_variance(rng):
    """Centred moments: values around 1000 (variance 9) lose nothing in
    float32 (Keras's E[x²] - E[x]² on PyTorch loses about 1e-4 here)."""
    layer = SyncBatchNormalization(momentum=0.5, epsilon=1e-3)
    x = rng.normal(1000.0, 3.0, size=(64, 3)).astype("float32")
    out = value_of(layer(x, training=True))
    exact = x.astype("float64")
    variance = exact.var(axis=0)
    np.testing.assert_allclose(
        out, (exact - exact.mean(0)) / np.sqrt(variance + 1e-3), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        value_of(layer.moving_variance), 0.5 + 0.5 * variance, rtol=1e-4
    )


def test_masked_values_are_left_out_as_by_keras(rng):
    ours, keras_bn = pair()
    x = rng.normal(size=(4, 6, 3)).astype("float32")
    mask = rng.random((4, 6)) > 0.3
    r = rng.normal(size=x.shape).astype("float32")
    got = step_with_gradients(ours, x, r, mask=mask)
    want = step_with_gradients(keras_bn, x, r, mask=mask)
    # Keras divides by `count + 1e-7`: equal to within that.
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        value_of(ours.moving_mean), value_of(keras_bn.moving_mean), rtol=1e-5, atol=1e-7
    )


def test_not_trainable_runs_in_inference_mode_like_keras(rng):
    ours, keras_bn = pair()
    x = rng.normal(2.0, 3.0, size=(8, 3)).astype("float32")
    ours(x, training=True)
    keras_bn(x, training=True)
    ours.trainable = keras_bn.trainable = False
    out = value_of(ours(x, training=True))
    assert_same(out, value_of(keras_bn(x, training=True)), "outputs")
    assert_same(
        value_of(ours.moving_mean), value_of(keras_bn.moving_mean), "moving_mean"
    )


def test_fit_equals_keras_batch_normalization(rng):
    x = rng.normal(2.0, 3.0, size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    results = []
    for layer in pair(momentum=0.8):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        dense = keras.layers.Dense(1, kernel_initializer=keras.initializers.Ones())
        model = keras.Model(inputs, dense(layer(inputs)))
        model.compile(keras.optimizers.SGD(0.1), "mse")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append(
            [value_of(v) for v in (layer.moving_mean, layer.moving_variance)]
        )
        results[-1] += [value_of(w) for w in model.trainable_weights]
    for ours, theirs in zip(*results, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_mixed_precision_computes_in_float32(rng):
    keras.config.set_dtype_policy("mixed_float16")
    layer = SyncBatchNormalization(momentum=0.5)
    x = rng.normal(300.0, 2.0, size=(16, 3)).astype("float32")
    out = layer(x, training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    assert value_of(layer.moving_mean).dtype == np.float32
    np.testing.assert_allclose(value_of(layer.moving_mean), 0.5 * x.mean(0), rtol=1e-3)
    np.testing.assert_allclose(
        value_of(out).astype("float32").std(0), np.ones(3), rtol=1e-2
    )


def test_state_names_are_keras_s():
    layer = SyncBatchNormalization()
    layer.build((None, 3))
    assert [v.name for v in layer.state_variables] == ["moving_mean", "moving_variance"]


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 3, 2)])
def test_state_contract(shape, rng):
    x = rng.normal(2.0, 3.0, size=shape).astype("float32")
    check_state_contract(lambda: SyncBatchNormalization(momentum=0.9), x)


def test_bad_arguments_say_what_to_write():
    with pytest.raises(ValueError, match=r"synchronized=False.*BatchNormalization"):
        SyncBatchNormalization(synchronized=False)
    with pytest.raises(ValueError, match=r"renorm=True"):
        SyncBatchNormalization(renorm=True)
    with pytest.raises(ValueError, match=r"momentum=1\.5"):
        SyncBatchNormalization(momentum=1.5)
    with pytest.raises(ValueError, match=r"axis=\(1, 2\)"):
        SyncBatchNormalization(axis=(1, 2))
    with pytest.raises(ValueError, match=r"axis=3 does not fit an input of rank 3"):
        SyncBatchNormalization(axis=3).build((None, 4, 5))


def test_normalization_guide_examples_run():
    """docs/normalization.md: the two examples run and build what they say."""
    guide = (
        pathlib.Path(__file__).parent.parent / "docs" / "normalization.md"
    ).read_text()
    critic_code, model_code = re.findall(r"```python\n(.*?)```", guide, re.S)
    namespace = {}
    exec(compile(critic_code, "normalization.md", "exec"), namespace)
    critic = namespace["critic"]
    kernel = value_of(critic.layers[-1].kernel)
    largest = np.linalg.svd(kernel, compute_uv=False)[0]
    np.testing.assert_allclose(value_of(critic.layers[-1].sigma()), largest, rtol=1e-2)
    namespace = {}
    exec(compile(model_code, "normalization.md", "exec"), namespace)
    assert isinstance(namespace["model"].layers[1], SyncBatchNormalization)
