"""VectorQuantizerEMA against a NumPy re-implementation of Sonnet's rule.

The reference is DeepMind Sonnet's `VectorQuantizerEMA` (`sonnet/src/nets/
vqvae.py` with `sonnet/src/moving_averages.py`), written with the textbook
one-hot: `counts = sum(one_hot, 0)`, `dw = x^T one_hot`, two zero-debiased
moving averages (`hidden -= (hidden - value) * (1 - decay)`, `average =
hidden / (1 - decay**counter)`), Laplace smoothing of the counts and
`embeddings = ema_dw / smoothed_counts`.
"""

import keras
import numpy as np
import pytest

import keras_stateful
from backends_test.helpers import value_of
from backends_test.test_stateful_layer import input_gradient
from keras_stateful.layers import vector_quantizer_ema
from keras_stateful.layers.vector_quantizer_ema import VectorQuantizerEMA
from keras_stateful.testing import check_state_contract, state_snapshot
from keras_stateful.testing.state_contract import ContractScale

K, D = 6, 3


class NumpySonnetVQ:
    """Sonnet's VectorQuantizerEMA, one batch at a time, in float64."""

    def __init__(self, embeddings, decay, epsilon=1e-5, commitment_cost=0.25):
        self.embeddings = embeddings.astype("float64")
        num_codes = len(embeddings)
        self.size_hidden = np.zeros(num_codes)
        self.dw_hidden = np.zeros_like(self.embeddings)
        self.cluster_size = np.zeros(num_codes)
        self.dw = np.zeros_like(self.embeddings)
        self.counter = 0
        self.decay, self.epsilon, self.beta = decay, epsilon, commitment_cost

    def codes(self, x):
        flat = x.reshape(-1, self.embeddings.shape[1]).astype("float64")
        distances = (
            (flat**2).sum(1, keepdims=True)
            - 2 * flat @ self.embeddings.T
            + (self.embeddings**2).sum(1)
        )
        return flat, distances.argmin(1)

    def __call__(self, x, training=True):
        """Returns output, loss, perplexity, usage; updates if training."""
        flat, codes = self.codes(x)
        num_codes = len(self.embeddings)
        quantized = self.embeddings[codes].reshape(x.shape)
        loss = self.beta * np.mean((quantized - x) ** 2)
        encodings = np.eye(num_codes)[codes]
        probs = encodings.mean(0)
        perplexity = np.exp(-np.sum(probs * np.log(probs + 1e-10)))
        usage = np.mean(encodings.sum(0) > 0)
        if training:
            self.counter += 1
            keep = 1 - self.decay
            self.size_hidden -= (self.size_hidden - encodings.sum(0)) * keep
            self.dw_hidden -= (self.dw_hidden - (flat.T @ encodings).T) * keep
            debias = 1 - self.decay**self.counter
            self.cluster_size = self.size_hidden / debias
            self.dw = self.dw_hidden / debias
            n = self.cluster_size.sum()
            smoothed = (
                (self.cluster_size + self.epsilon) / (n + num_codes * self.epsilon) * n
            )
            self.embeddings = self.dw / smoothed[:, None]
        return quantized, loss, perplexity, usage


def check_state(layer, reference, rtol=1e-5, atol=1e-6):
    state = state_snapshot(layer)
    for name, expected in [
        ("embeddings", reference.embeddings),
        ("ema_cluster_size", reference.cluster_size),
        ("ema_dw", reference.dw),
        ("ema_cluster_size_hidden", reference.size_hidden),
        ("ema_dw_hidden", reference.dw_hidden),
    ]:
        np.testing.assert_allclose(
            state[name], expected, rtol=rtol, atol=atol, err_msg=name
        )
    assert state["counter"] == reference.counter


def initial_embeddings(num_codes=K, dim=D, **kwargs):
    layer = VectorQuantizerEMA(num_codes, dim, seed=0, **kwargs)
    layer.build((None, dim))
    return value_of(layer.embeddings)


def clustered(rng, embeddings, rows, spread=0.05, shape=None):
    """Inputs close to codes 0-3, so no two codes are nearly tied."""
    centers = embeddings[rng.integers(0, 4, size=rows)]
    x = centers + spread * rng.normal(size=centers.shape)
    return x.astype("float32").reshape(shape or x.shape)


def vq_model(layer, input_shape):
    """Input -> trainable scale (1, lr 0) -> the layer; the loss is its own."""
    inputs = keras.Input(input_shape)
    model = keras.Model(inputs, layer(ContractScale()(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    return model


# ---- the rule ---------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.99, 0.5])
def test_matches_sonnet_rule_over_steps(decay, rng):
    layer = VectorQuantizerEMA(K, D, decay=decay, commitment_cost=0.4, seed=0)
    # Rank 3 inputs, and codes that go unused (Sonnet moves them to 0).
    batches = [rng.normal(size=(4, 5, D)).astype("float32") for _ in range(5)]
    layer.build(batches[0].shape)
    codebook = value_of(layer.embeddings)
    codebook[-1] = 10.0  # a code far from every input
    layer.embeddings.assign(codebook)
    reference = NumpySonnetVQ(codebook, decay, commitment_cost=0.4)
    for step, batch in enumerate(batches):
        layer.reset_logged_values()
        output = layer(batch, training=True)
        quantized, loss, perplexity, usage = reference(batch)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(output), quantized, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(layer.losses[0]), loss, rtol=1e-5
        )
        logged = layer.logged_values()
        name = layer.name
        np.testing.assert_allclose(logged[f"{name}_perplexity"], perplexity, rtol=1e-5)
        np.testing.assert_allclose(logged[f"{name}_usage"], usage, rtol=1e-6)
        np.testing.assert_allclose(logged[f"{name}_commitment_loss"], loss, rtol=1e-5)
        check_state(layer, reference)
        if step == 0:  # the far code was not chosen: Sonnet moves it to 0
            assert not value_of(layer.embeddings)[-1].any()


def test_first_step_embeddings_are_the_cluster_means(rng):
    """Debiased: after one step N_k = n_k, M_k = s_k, e_k = s_k / smoothed n_k."""
    layer = VectorQuantizerEMA(K, D, epsilon=1e-5, seed=0)
    x = clustered(rng, initial_embeddings(), 40)
    layer(x, training=True)
    reference = NumpySonnetVQ(initial_embeddings(), 0.99)
    _, codes = reference.codes(x)
    for code in np.unique(codes):
        np.testing.assert_allclose(
            value_of(layer.embeddings)[code], x[codes == code].mean(0), rtol=1e-4
        )
    np.testing.assert_allclose(
        value_of(layer.ema_cluster_size), np.bincount(codes, minlength=K), rtol=1e-5
    )


@pytest.mark.parametrize("codes, chunks", [(300, 3), (257, 2)])
def test_chunked_search_matches_the_full_distance_matrix(
    codes, chunks, rng, monkeypatch
):
    # At most 256 codes a chunk, as a huge N x K would be: 300 codes in 3
    # interleaved chunks of 100, or 257 (prime) in 2 chunks of 129, padded.
    monkeypatch.setattr(vector_quantizer_ema, "_SEARCH_ELEMENTS", 16)
    layer = VectorQuantizerEMA(codes, 8, seed=0)
    x = rng.normal(size=(64, 8)).astype("float32")
    layer.build(x.shape)
    assert layer._codes_per_chunk(64) == 256
    assert layer._search_chunks(-(-codes // 256)) == chunks
    reference = NumpySonnetVQ(value_of(layer.embeddings), 0.99)
    for _ in range(2):
        output = layer(x, training=True)
        quantized, *_ = reference(x)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(output), quantized, rtol=1e-5, atol=1e-6
        )
    check_state(layer, reference)


def test_input_of_rank_4_is_quantized_vector_by_vector(rng):
    images = rng.normal(size=(2, 3, 4, D)).astype("float32")
    image_layer = VectorQuantizerEMA(K, D, seed=0)
    flat_layer = VectorQuantizerEMA(K, D, seed=0)
    output = image_layer(images, training=True)
    flat_output = flat_layer(images.reshape(-1, D), training=True)
    assert tuple(output.shape) == images.shape
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(output).reshape(-1, D),
        keras.ops.convert_to_numpy(flat_output),
    )
    for name, value in state_snapshot(flat_layer).items():
        np.testing.assert_allclose(state_snapshot(image_layer)[name], value, rtol=1e-6)
    assert image_layer.compute_output_shape((None, 3, 4, D)) == (None, 3, 4, D)


# ---- gradient, loss, inference ----------------------------------------------


def test_straight_through_gradient_reaches_the_input_unchanged(rng):
    x = rng.normal(size=(5, 2, D)).astype("float32")
    layer = VectorQuantizerEMA(K, D, seed=0)
    layer.build(x.shape)
    before = value_of(layer.embeddings)
    np.testing.assert_array_equal(input_gradient(layer, x), np.ones_like(x))
    assert not np.array_equal(value_of(layer.embeddings), before), "no update"


def test_commitment_loss_and_output_use_the_codebook_before_the_update(rng):
    x = rng.normal(size=(8, D)).astype("float32")
    layer = VectorQuantizerEMA(K, D, commitment_cost=2.0, seed=0)
    reference = NumpySonnetVQ(initial_embeddings(), 0.99, commitment_cost=2.0)
    output = layer(x, training=True)
    quantized, loss, _, _ = reference(x, training=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(output), quantized, 1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.losses[0]), loss, 1e-6)
    assert loss > 0 and not np.allclose(value_of(layer.embeddings), quantized[:K])


def test_inference_does_not_update_or_log_but_quantizes(rng):
    x = rng.normal(size=(8, D)).astype("float32")
    layer = VectorQuantizerEMA(K, D, seed=0, restart_threshold=1.0)
    layer.build(x.shape)
    initial = state_snapshot(layer)
    reference = NumpySonnetVQ(initial["embeddings"], 0.99)
    for training in (False, None):
        output = layer(x, training=training)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(output), reference(x, training=False)[0], 1e-6
        )
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, initial[name])
    assert np.isnan(layer.logged_values()[f"{layer.name}_usage"])
    with keras_stateful.evaluation_logging():  # e.g. Keras's test_step
        layer(x, training=False)
    assert layer.logged_values()[f"{layer.name}_usage"] > 0


def test_mixed_precision_output_dtype_and_float32_state(rng):
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = VectorQuantizerEMA(K, D, seed=0)
    output = layer(rng.normal(size=(4, D)).astype("float32"), training=True)
    assert keras.backend.standardize_dtype(output.dtype) == "bfloat16"
    assert {v.dtype for v in layer.state_variables} == {"float32", "int32"}
    assert np.all(np.isfinite(value_of(layer.embeddings)))


# ---- fit: logs and restarts -------------------------------------------------


def test_perplexity_usage_and_loss_are_in_fit_history(rng):
    x = rng.normal(size=(16, 2, D)).astype("float32")
    layer = VectorQuantizerEMA(K, D, seed=0, name="vq")
    model = vq_model(layer, (2, D))
    reference = NumpySonnetVQ(initial_embeddings(), 0.99)
    expected = [reference(batch)[1:] for batch in (x[:8], x[8:])]
    history = model.fit(
        x,
        batch_size=8,
        shuffle=False,
        verbose=0,
        callbacks=[keras_stateful.LogLayerValues()],
    ).history
    loss, perplexity, usage = np.mean(expected, axis=0)  # equal batch sizes
    np.testing.assert_allclose(history["vq_perplexity"], [perplexity], rtol=1e-5)
    np.testing.assert_allclose(history["vq_usage"], [usage], rtol=1e-6)
    np.testing.assert_allclose(history["vq_commitment_loss"], [loss], rtol=1e-5)
    np.testing.assert_allclose(history["vq_commitment_loss"], history["loss"], 1e-5)
    check_state(layer, reference)


def test_dead_codes_are_restarted_from_batch_vectors_under_fit(rng):
    embeddings = initial_embeddings(8, 4)
    x = clustered(rng, embeddings, 16, shape=(8, 2, 4))  # only codes 0-3 used
    restarted = VectorQuantizerEMA(8, 4, seed=0, restart_threshold=0.5)
    plain = VectorQuantizerEMA(8, 4, seed=0)
    models = [vq_model(layer, (2, 4)) for layer in (restarted, plain)]
    seed = value_of(restarted.restart_seed)
    np.testing.assert_array_equal(seed, [0, 0])  # seed=0, nothing drawn yet
    for model in models:
        model.fit(x, batch_size=8, verbose=0)  # one step
    # The generator advanced once, with the update.
    np.testing.assert_array_equal(
        value_of(restarted.restart_seed), seed + np.array([0, 1])
    )
    reference = NumpySonnetVQ(embeddings, 0.99)
    reference(x)

    # Off by default: Sonnet's rule, the unused codes sit at the origin.
    check_state(plain, reference)
    dead = reference.cluster_size < 0.5
    assert dead[4:].all() and not np.any(value_of(plain.embeddings)[dead])

    # On: each dead code holds a vector of the batch; the others follow Sonnet.
    state = state_snapshot(restarted)
    rows = x.reshape(-1, 4)
    for row in state["embeddings"][dead]:
        assert np.any(np.all(row == rows, axis=1)), f"{row} is no input vector"
    np.testing.assert_allclose(state["ema_cluster_size"][dead], 0.5)
    np.testing.assert_allclose(
        state["ema_dw"][dead], 0.5 * state["embeddings"][dead], rtol=1e-6
    )
    for name in ("embeddings", "ema_cluster_size", "ema_dw"):
        expected = {
            "embeddings": reference.embeddings,
            "ema_cluster_size": reference.cluster_size,
            "ema_dw": reference.dw,
        }[name]
        np.testing.assert_allclose(
            state[name][~dead], expected[~dead], rtol=1e-5, err_msg=name
        )


# ---- the state contract -----------------------------------------------------


def test_state_contract(rng):
    x = clustered(rng, initial_embeddings(), 16, shape=(8, 2, D))
    check_state_contract(lambda: VectorQuantizerEMA(K, D, seed=0), x)


def test_state_contract_with_restarts(rng):
    x = clustered(rng, initial_embeddings(), 16, shape=(8, 2, D))
    check_state_contract(
        lambda: VectorQuantizerEMA(K, D, seed=0, restart_threshold=1.0),
        x,
        jit_compile_modes=("auto",),
        mixed_precision_policies=(),
    )


# ---- errors -----------------------------------------------------------------


def test_bad_inputs_say_what_to_write(rng):
    x = rng.normal(size=(4, 5)).astype("float32")
    with pytest.raises(ValueError, match=r"\(batch, \.\.\., 3\).*\(4, 5\).*Dense\(3\)"):
        VectorQuantizerEMA(K, D)(x)
    with pytest.raises(ValueError, match=r"\(num_embeddings, embedding_dim\)"):
        VectorQuantizerEMA(3, 5)(x[:, :3])  # meant 5 codes of dim 3?
    with pytest.raises(ValueError, match=r"received shape \(3,\)"):
        VectorQuantizerEMA(K, D).build((3,))  # no batch axis
    with pytest.raises(TypeError, match=r"floating point.*received dtype int32"):
        VectorQuantizerEMA(K, D)(np.zeros((2, D), "int32"))


def test_bad_arguments_are_refused():
    for kwargs, message in [
        ({"decay": 1.0}, r"decay must be in \[0, 1\); received decay=1\.0"),
        ({"epsilon": 0.0}, r"epsilon=0\.0"),
        ({"commitment_cost": -1.0}, r"commitment_cost=-1\.0"),
        ({"restart_threshold": 0.0}, r"restart_threshold=0\.0"),
        ({"num_embeddings": 0}, r"num_embeddings=0"),
        ({"seed": 1.5}, r"seed=1\.5"),
    ]:
        args = {"num_embeddings": K, "embedding_dim": D, **kwargs}
        with pytest.raises(ValueError, match=message):
            VectorQuantizerEMA(**args)


def test_empty_batch_adds_zero_loss_and_updates_nothing():
    layer = VectorQuantizerEMA(K, D, seed=0)
    layer.build((None, D))
    initial = state_snapshot(layer)
    output = layer(np.zeros((0, D), "float32"), training=True)
    assert tuple(output.shape) == (0, D)
    assert float(keras.ops.convert_to_numpy(layer.losses[0])) == 0.0
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, initial[name])


def test_config_round_trip():
    layer = VectorQuantizerEMA(
        K, D, commitment_cost=0.5, decay=0.9, restart_threshold=2.0, seed=3
    )
    clone = VectorQuantizerEMA.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.restart_threshold == 2.0 and clone.seed == 3
