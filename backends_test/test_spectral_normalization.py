"""SpectralNormalization against a NumPy power iteration (every backend) and
torch's `spectral_norm` (PyTorch backend), number for number; the kernel is
never written; each Keras 3 defect of `keras.layers.SpectralNormalization`
(keras-team/keras#19527, #20309, #19183, and the measured ones) absent."""

import keras
import numpy as np
import pytest

from backends_test.helpers import BACKEND, value_of
from keras_stateful.layers import SpectralNormalization
from keras_stateful.testing import check_state_contract, state_snapshot

STEPS = 4
LEARNING_RATE = 0.1
EPS = 1e-12


def seeded(seed=1):
    return keras.initializers.GlorotUniform(seed=seed)


def normalize(x):
    return x / max(np.linalg.norm(x), EPS)


def numpy_power_iteration(matrix, u, v, iterations):
    """torch's `_power_method`: `u = normalize(W v)`, then `v = normalize(Wᵀ u)`."""
    for _ in range(iterations):
        u = normalize(matrix @ v)
        v = normalize(matrix.T @ u)
    return u, v


def numpy_dense_steps(kernel, bias, u, v, batches, weights, iterations):
    """Training steps of a spectrally normalized Dense and SGD, in float64.

    The loss is `sum(outputs * weights)`. With `W = Kᵀ` and `sigma = uᵀ W v`
    (`u`, `v` constants), `d sigma / d K = v uᵀ`, so the kernel gradient is
    `xᵀ R / sigma - sum((x K) * R) / sigma² * v uᵀ`.
    """
    kernel, bias = kernel.astype("float64"), bias.astype("float64")
    records = []
    for x, r in zip(batches, weights, strict=True):
        x, r = x.astype("float64"), r.astype("float64")
        u, v = numpy_power_iteration(kernel.T, u, v, iterations)
        sigma = u @ kernel.T @ v
        outputs = x @ kernel / sigma + bias
        grad_kernel = x.T @ r / sigma - np.sum((x @ kernel) * r) / sigma**2 * np.outer(
            v, u
        )
        grad_bias = r.sum(axis=0)
        records.append(
            {
                "outputs": outputs,
                "sigma": sigma,
                "u": u,
                "v": v,
                "grad_kernel": grad_kernel,
                "grad_bias": grad_bias,
            }
        )
        kernel = kernel - LEARNING_RATE * grad_kernel
        bias = bias - LEARNING_RATE * grad_bias
    return records


def training_step(layer, x, r):
    """`(outputs, [grads of layer.trainable_variables])` of `sum(out * r)`,
    with the state updated, on the running backend."""
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(values):
            out, state = layer.stateless_call(values, non_trainable, x, training=True)
            return jnp.sum(out * r), (out, state)

        (_, (out, state)), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
        for variable, value in zip(layer.non_trainable_variables, state, strict=True):
            variable.assign(value)
        return value_of(out), [np.asarray(g) for g in grads]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            out = layer(x, training=True)
            loss = tf.reduce_sum(out * r)
        grads = tape.gradient(loss, layer.trainable_variables)
        return value_of(out), [g.numpy() for g in grads]
    import torch

    out = layer(torch.tensor(x), training=True)
    loss = torch.sum(out * torch.tensor(r))
    grads = torch.autograd.grad(loss, [v.value for v in layer.trainable_variables])
    return value_of(out.detach()), [g.numpy() for g in grads]


def sgd(layer, grads):
    for variable, grad in zip(layer.trainable_variables, grads, strict=True):
        variable.assign(value_of(variable) - LEARNING_RATE * grad)


def dense_data(rng, batch=6, features=5, units=4):
    batches = [
        rng.normal(size=(batch, features)).astype("float32") for _ in range(STEPS)
    ]
    weights = [rng.normal(size=(batch, units)).astype("float32") for _ in range(STEPS)]
    return batches, weights


# ------------------------------------------------ NumPy reference, every backend


@pytest.mark.parametrize("iterations", [1, 3])
def test_dense_matches_numpy_power_iteration_over_steps(iterations, rng):
    batches, weights = dense_data(rng)
    layer = SpectralNormalization(
        keras.layers.Dense(4, kernel_initializer=seeded(), bias_initializer=seeded(2)),
        power_iterations=iterations,
    )
    layer.build((None, 5))
    kernel = value_of(layer.layer.kernel)
    bias = value_of(layer.layer.bias)
    u0, v0 = value_of(layer.vector_u), value_of(layer.vector_v)
    expected = numpy_dense_steps(
        kernel,
        bias,
        u0.astype("float64"),
        v0.astype("float64"),
        batches,
        weights,
        iterations,
    )
    for step, (x, r, want) in enumerate(zip(batches, weights, expected, strict=True)):
        out, (grad_kernel, grad_bias) = training_step(layer, x, r)
        seen = {
            "outputs": out,
            "sigma": value_of(layer.sigma()),
            "u": value_of(layer.vector_u),
            "v": value_of(layer.vector_v),
            "grad_kernel": grad_kernel,
            "grad_bias": grad_bias,
        }
        for name, value in seen.items():
            np.testing.assert_allclose(
                value, want[name], rtol=1e-5, atol=1e-5, err_msg=f"step {step}: {name}"
            )
        sgd(layer, [grad_kernel, grad_bias])


def kernel_matrix(layer):
    """The kernel as `(out, in)`: Keras `(..., out)` transposed; Embedding as is."""
    kernel = value_of(layer.kernel).astype("float64")
    if isinstance(layer.layer, keras.layers.Embedding):
        return kernel
    return kernel.reshape(-1, kernel.shape[-1]).T


WRAPPED = {
    "Conv1D": (
        lambda: keras.layers.Conv1D(3, 2, kernel_initializer=seeded()),
        (4, 7, 2),
    ),
    "Conv2D": (
        lambda: keras.layers.Conv2D(3, (2, 3), kernel_initializer=seeded()),
        (4, 5, 6, 2),
    ),
    "Conv3D": (
        lambda: keras.layers.Conv3D(3, 2, kernel_initializer=seeded()),
        (2, 4, 4, 3, 2),
    ),
    "EinsumDense": (
        lambda: keras.layers.EinsumDense(
            "abc,cd->abd", (3, 4), bias_axes="d", kernel_initializer=seeded()
        ),
        (4, 3, 5),
    ),
    "Embedding": (
        lambda: keras.layers.Embedding(7, 3, embeddings_initializer=seeded()),
        "ids",
    ),
}


def inputs_for(shape, rng):
    if shape == "ids":
        return rng.integers(0, 7, size=(6, 2)).astype("int32")
    return rng.normal(size=shape).astype("float32")


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_every_wrapped_layer_runs_with_kernel_over_numpy_sigma(name, rng):
    factory, shape = WRAPPED[name]
    layer = SpectralNormalization(factory(), power_iterations=2)
    x = inputs_for(shape, rng)
    layer(x)  # built, not training
    matrix = kernel_matrix(layer)
    assert value_of(layer.vector_u).shape == (matrix.shape[0],)
    assert value_of(layer.vector_v).shape == (matrix.shape[1],)
    u = value_of(layer.vector_u).astype("float64")
    v = value_of(layer.vector_v).astype("float64")
    kernel = value_of(layer.kernel)
    plain = factory()
    plain(x)
    for step in range(3):
        u, v = numpy_power_iteration(matrix, u, v, 2)
        sigma = u @ matrix @ v
        out = value_of(layer(x, training=True))
        np.testing.assert_allclose(value_of(layer.vector_u), u, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(value_of(layer.vector_v), v, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(value_of(layer.sigma()), sigma, rtol=1e-5)
        plain.set_weights(
            [
                kernel / sigma if w.shape == kernel.shape else w
                for w in layer.layer.get_weights()
            ]
        )
        np.testing.assert_allclose(
            out, value_of(plain(x)), rtol=1e-5, atol=1e-6, err_msg=f"step {step}"
        )
    np.testing.assert_array_equal(value_of(layer.kernel), kernel)


def test_warm_start_is_close_and_reset_restores_it(rng):
    layer = SpectralNormalization(keras.layers.Dense(6, kernel_initializer=seeded()))
    layer.build((None, 8))
    largest = np.linalg.svd(kernel_matrix(layer), compute_uv=False)[0]
    np.testing.assert_allclose(value_of(layer.sigma()), largest, rtol=1e-2)
    for vector in (layer.vector_u, layer.vector_v):
        np.testing.assert_allclose(np.linalg.norm(value_of(vector)), 1.0, rtol=1e-6)
    built = state_snapshot(layer)
    for _ in range(3):
        layer(rng.normal(size=(4, 8)).astype("float32"), training=True)
    assert not np.array_equal(state_snapshot(layer)["vector_u"], built["vector_u"])
    layer.reset_state()
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, built[name], err_msg=name)
    # The same kernel always warm-starts to the same vectors.
    again = SpectralNormalization(keras.layers.Dense(6, kernel_initializer=seeded()))
    again.build((None, 8))
    for name, value in state_snapshot(again).items():
        np.testing.assert_array_equal(value, built[name], err_msg=name)


def test_inference_uses_the_stored_vectors_without_iterating(rng):
    layer = SpectralNormalization(keras.layers.Dense(3, kernel_initializer=seeded()))
    x = rng.normal(size=(4, 5)).astype("float32")
    layer(x, training=True)
    before = state_snapshot(layer)
    matrix = kernel_matrix(layer)
    sigma = before["vector_u"] @ matrix @ before["vector_v"]
    out = value_of(layer(x, training=False))
    np.testing.assert_allclose(
        out, x @ value_of(layer.kernel) / sigma, rtol=1e-5, atol=1e-6
    )
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_all_zero_kernel_gives_zeros_not_nan():
    layer = SpectralNormalization(
        keras.layers.Dense(3, kernel_initializer="zeros", use_bias=False)
    )
    out = value_of(layer(np.ones((2, 4), "float32"), training=True))
    np.testing.assert_array_equal(out, np.zeros((2, 3)))


# --------------------------------------------- the Keras 3 defects, absent here


def twelve_steps_at_learning_rate_zero(rng):
    x = rng.normal(size=(48, 5)).astype("float32")
    inputs = keras.Input((5,))
    wrapper = SpectralNormalization(keras.layers.Dense(4, kernel_initializer=seeded()))
    model = keras.Model(inputs, wrapper(inputs))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    kernel = value_of(wrapper.kernel)
    start = state_snapshot(wrapper)
    model.fit(x, np.zeros((48, 4)), batch_size=4, epochs=1, shuffle=False, verbose=0)
    return wrapper, model, x, kernel, start


def test_kernel_is_not_overwritten_by_fit(rng):
    """Keras 3 on TensorFlow and PyTorch writes `W / sigma` into the kernel
    (largest singular value 1.44 -> 1.00 in 12 steps at learning rate 0)."""
    wrapper, model, x, kernel, _ = twelve_steps_at_learning_rate_zero(rng)
    np.testing.assert_array_equal(value_of(wrapper.kernel), kernel)
    model.predict(x, verbose=0)
    model.evaluate(x, np.zeros((48, 4)), verbose=0)
    wrapper(x, training=True)
    np.testing.assert_array_equal(value_of(wrapper.kernel), kernel)
    assert np.linalg.svd(kernel, compute_uv=False)[0] > 1.1  # not normalized


def test_same_numbers_as_the_numpy_reference_after_twelve_steps(rng):
    """Keras 3 gives JAX one result (kernel kept) and TF/PyTorch another;
    here every backend ends where the NumPy power iteration does."""
    wrapper, model, x, kernel, start = twelve_steps_at_learning_rate_zero(rng)
    matrix = kernel.astype("float64").T
    u, v = numpy_power_iteration(
        matrix,
        start["vector_u"].astype("float64"),
        start["vector_v"].astype("float64"),
        12,
    )
    np.testing.assert_allclose(value_of(wrapper.vector_u), u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value_of(wrapper.vector_v), v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), x @ kernel / (u @ matrix @ v), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("jit_compile", ["auto", False])
def test_vector_u_updates_under_mixed_float16(jit_compile, rng):
    """Keras 3 on PyTorch never updates `vector_u` under `mixed_float16`."""
    keras.config.set_dtype_policy("mixed_float16")
    x = rng.normal(size=(8, 5)).astype("float32")
    inputs = keras.Input((5,))
    wrapper = SpectralNormalization(
        keras.layers.Dense(4, kernel_initializer=seeded()), power_iterations=1
    )
    model = keras.Model(inputs, wrapper(inputs))
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=jit_compile)
    start = state_snapshot(wrapper)
    model.fit(x, np.zeros((8, 4)), batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert value_of(wrapper.vector_u).dtype == np.float32
    assert not np.array_equal(value_of(wrapper.vector_u), start["vector_u"])
    matrix = value_of(wrapper.kernel).astype("float64").T
    u, _ = numpy_power_iteration(
        matrix,
        start["vector_u"].astype("float64"),
        start["vector_v"].astype("float64"),
        2,
    )
    np.testing.assert_allclose(value_of(wrapper.vector_u), u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit_compile", ["auto", False])
def test_fit_of_a_functional_model_with_conv_and_embedding(jit_compile, rng):
    """keras-team/keras#19183 (a symbolic tensor error in `fit`) and #19527
    (fails on PyTorch): a functional model with wrapped Embedding, Conv1D
    and Dense trains on every backend, and its gradients stay finite
    (#20309: no gradient through `u` and `v`)."""
    ids = keras.Input((6,), dtype="int32")
    h = SpectralNormalization(keras.layers.Embedding(10, 4))(ids)
    h = SpectralNormalization(keras.layers.Conv1D(3, 2, activation="relu"))(h)
    h = keras.layers.Flatten()(h)
    out = SpectralNormalization(keras.layers.Dense(1))(h)
    model = keras.Model(ids, out)
    model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit_compile)
    x = rng.integers(0, 10, size=(16, 6)).astype("int32")
    history = model.fit(x, np.ones((16, 1)), batch_size=4, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


# ----------------------------------------------------------- torch reference


def torch_module(layer):
    """The torch layer that holds the same weights as the Keras `layer`."""
    import torch

    kernel = value_of(layer.kernel)
    wrapped = layer.layer
    if isinstance(wrapped, keras.layers.Embedding):
        module = torch.nn.Embedding(*kernel.shape)
        weight = kernel
    elif isinstance(wrapped, keras.layers.Conv2D):
        module = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[:2])
        weight = kernel.transpose(3, 2, 0, 1)
    else:
        module = torch.nn.Linear(*kernel.shape)
        weight = kernel.T
    with torch.no_grad():
        module.weight.copy_(torch.tensor(weight))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.tensor(value_of(wrapped.bias)))
    return module.double()


def torch_v(layer, v):
    """Our `v` in torch's column order (a Conv2D kernel's `(kh, kw, in)` ->
    torch's `(in, kh, kw)`)."""
    if isinstance(layer.layer, keras.layers.Conv2D):
        kh, kw, cin, _ = value_of(layer.kernel).shape
        return v.reshape(kh, kw, cin).transpose(2, 0, 1).reshape(-1)
    return v


def torch_forward(module, x):
    import torch

    if isinstance(module, torch.nn.Embedding):
        return module(torch.tensor(x).long())
    if isinstance(module, torch.nn.Conv2d):
        return module(torch.tensor(x).double().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return module(torch.tensor(x).double())


TORCH_CASES = {
    "Dense": (lambda: keras.layers.Dense(4, kernel_initializer=seeded()), (6, 5)),
    "Conv2D": (
        lambda: keras.layers.Conv2D(3, (2, 3), kernel_initializer=seeded()),
        (3, 5, 6, 2),
    ),
    "Embedding": (
        lambda: keras.layers.Embedding(7, 3, embeddings_initializer=seeded()),
        "ids",
    ),
}


@pytest.mark.skipif(
    BACKEND != "torch", reason="torch is installed in the torch session only"
)
@pytest.mark.parametrize("iterations", [1, 2])
@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_matches_torch_spectral_norm_over_steps(name, iterations, rng):
    """Outputs, sigma, `u`, `v` and the kernel gradient, over SGD steps."""
    import torch
    from torch.nn.utils.parametrizations import spectral_norm

    factory, shape = TORCH_CASES[name]
    layer = SpectralNormalization(factory(), power_iterations=iterations)
    x0 = inputs_for(shape, rng)
    layer(x0)
    module = spectral_norm(torch_module(layer), n_power_iterations=iterations, eps=EPS)
    parametrization = module.parametrizations.weight[0]
    with torch.no_grad():
        parametrization._u.copy_(torch.tensor(value_of(layer.vector_u)))
        parametrization._v.copy_(torch.tensor(torch_v(layer, value_of(layer.vector_v))))
    module.train()
    for step in range(STEPS):
        x = inputs_for(shape, rng)
        out = layer(torch.tensor(x), training=True)
        r = rng.normal(size=tuple(out.shape)).astype("float32")
        (grad,) = torch.autograd.grad(
            torch.sum(out * torch.tensor(r)), [layer.kernel.value]
        )
        expected = torch_forward(module, x)
        (expected_grad,) = torch.autograd.grad(
            torch.sum(expected * torch.tensor(r).double()),
            [module.parametrizations.weight.original],
        )
        u = parametrization._u.numpy()
        v = parametrization._v.numpy()
        sigma = float(
            u
            @ module.parametrizations.weight.original.detach()
            .numpy()
            .reshape(len(u), -1)
            @ v
        )
        checks = {
            "outputs": (value_of(out.detach()), expected.detach().numpy()),
            "sigma": (value_of(layer.sigma().detach()), sigma),
            "u": (value_of(layer.vector_u), u),
            "v": (torch_v(layer, value_of(layer.vector_v)), v),
            "kernel gradient": (
                torch_layout(layer, grad.numpy()),
                expected_grad.numpy(),
            ),
        }
        for label, (ours, theirs) in checks.items():
            np.testing.assert_allclose(
                ours,
                theirs,
                rtol=1e-5,
                atol=1e-5,
                err_msg=f"{name}, step {step}: {label}",
            )
        with torch.no_grad():
            layer.kernel.value.sub_(LEARNING_RATE * grad)
            module.parametrizations.weight.original.sub_(LEARNING_RATE * expected_grad)


def torch_layout(layer, kernel):
    """A Keras kernel (or its gradient) in torch's weight layout."""
    if isinstance(layer.layer, keras.layers.Embedding):
        return kernel
    if isinstance(layer.layer, keras.layers.Conv2D):
        return kernel.transpose(3, 2, 0, 1)
    return kernel.T


# ---------------------------------------------------------- contract and errors


@pytest.mark.parametrize("name", ["Dense", "Conv2D"])
def test_state_contract(name, rng):
    if name == "Dense":
        check_state_contract(
            lambda: SpectralNormalization(
                keras.layers.Dense(3, kernel_initializer=seeded())
            ),
            rng.normal(size=(8, 5)).astype("float32"),
        )
    else:
        check_state_contract(
            lambda: SpectralNormalization(
                keras.layers.Conv2D(2, 3, kernel_initializer=seeded()),
                power_iterations=2,
            ),
            rng.normal(size=(4, 5, 5, 2)).astype("float32"),
        )


def test_unsupported_layer_is_refused_with_what_to_write():
    with pytest.raises(ValueError, match=r"received <Conv2DTranspose.*Write e\.g\."):
        SpectralNormalization(keras.layers.Conv2DTranspose(2, 3))
    with pytest.raises(ValueError, match=r"Dense, EinsumDense.*received <Dropout"):
        SpectralNormalization(keras.layers.Dropout(0.5))


def test_bad_power_iterations_and_epsilon():
    with pytest.raises(ValueError, match=r"power_iterations=0"):
        SpectralNormalization(keras.layers.Dense(2), power_iterations=0)
    with pytest.raises(ValueError, match=r"epsilon=-1"):
        SpectralNormalization(keras.layers.Dense(2), epsilon=-1.0)
