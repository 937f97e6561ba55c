"""VectorQuantizerEMA's kmeans_init, use_cosine_sim and threshold_ema_dead_code.

Each option is checked number for number against `NumpyVQ`, Sonnet's rule
(`NumpySonnetVQ`) extended the way vector-quantize-pytorch extends it:

- k-means (Lloyd, `kmeans_iters` iterations, empty clusters keep their mean)
  over the first training batch, starting from the rows at positions
  `floor(k * n / K)`; the codebook becomes the means and the EMAs agree with
  them as a first observation: counter 1, `N_k` = cluster sizes,
  `M_k = N_k * mean_k`, hidden values `(1 - g)` times those;
- cosine similarity: inputs and codes L2-normalised, the codebook
  renormalised after each EMA step;
- dead codes: after the EMA step, codes with `N_k < t` take a batch vector
  and `N_k = t`, `M_k = t * vector` (hidden values to match), so the same
  step's EMA cannot undo the restart (encodec#61). The positions are drawn
  with the layer's own saved seed, read before the step.
"""

import warnings

import keras
import numpy as np
import pytest

from backends_test.helpers import value_of
from backends_test.test_vector_quantizer_ema import (
    NumpySonnetVQ,
    clustered,
    initial_embeddings,
    vq_model,
)
from keras_stateful.layers import VectorQuantizerEMA
from keras_stateful.layers._seeds import SeedValue
from keras_stateful.testing import check_state_contract, state_snapshot

K, D = 6, 3


def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def numpy_kmeans(data, num_codes, iters, cosine=False):
    n = len(data)
    starts = (np.arange(num_codes) * n + 0.5) // num_codes
    means = data[starts.astype(int)].copy()
    sizes = np.zeros(num_codes)
    for _ in range(iters):
        distances = (
            (data**2).sum(1, keepdims=True) - 2 * data @ means.T + (means**2).sum(1)
        )
        nearest = distances.argmin(1)
        sizes = np.bincount(nearest, minlength=num_codes).astype("float64")
        sums = np.zeros_like(means)
        np.add.at(sums, nearest, data)
        new = sums / np.maximum(sizes, 1.0)[:, None]
        if cosine:
            new = unit(new)
        means = np.where(sizes[:, None] > 0, new, means)
    return means, sizes


class NumpyVQ(NumpySonnetVQ):
    """Sonnet's rule with kmeans_init, use_cosine_sim and dead-code restarts."""

    def __init__(
        self,
        embeddings,
        decay,
        *,
        kmeans_iters=None,
        cosine=False,
        threshold=None,
        draws=None,
        **kwargs,
    ):
        super().__init__(unit(embeddings) if cosine else embeddings, decay, **kwargs)
        self.kmeans_iters, self.cosine = kmeans_iters, cosine
        self.threshold, self.draws = threshold, draws

    def __call__(self, x, training=True):
        x = unit(x.astype("float64")) if self.cosine else x.astype("float64")
        if training and self.kmeans_iters is not None and self.counter == 0:
            self.initialize(x.reshape(-1, self.embeddings.shape[1]))
        result = super().__call__(x, training)
        if training and self.cosine:
            self.embeddings = unit(self.embeddings)
        if training and self.threshold is not None:
            self.restart(x.reshape(-1, self.embeddings.shape[1]))
        return result

    def initialize(self, flat):
        means, sizes = numpy_kmeans(
            flat, len(self.embeddings), self.kmeans_iters, self.cosine
        )
        rate = 1 - self.decay
        self.embeddings, self.cluster_size = means, sizes
        self.dw = means * sizes[:, None]
        self.size_hidden, self.dw_hidden = rate * sizes, rate * self.dw
        self.counter = 1

    def restart(self, flat):
        draw = self.draws()  # the layer's uniform draws for this step
        picks = np.minimum(np.floor(draw * len(flat)).astype(int), len(flat) - 1)
        seeds = unit(flat[picks]) if self.cosine else flat[picks]
        dead = self.cluster_size < self.threshold
        debias = 1 - self.decay**self.counter
        t = self.threshold
        self.embeddings = np.where(dead[:, None], seeds, self.embeddings)
        self.cluster_size = np.where(dead, t, self.cluster_size)
        self.dw = np.where(dead[:, None], t * seeds, self.dw)
        self.size_hidden = np.where(dead, t * debias, self.size_hidden)
        self.dw_hidden = np.where(dead[:, None], t * debias * seeds, self.dw_hidden)
        self.dead = dead


def layer_draws(layer):
    """The uniform draws the layer makes at its next step (from its seed)."""
    seed = keras.ops.convert_to_tensor(value_of(layer.restart_seed))
    draw = keras.random.uniform((layer.num_embeddings,), seed=SeedValue(seed))
    return keras.ops.convert_to_numpy(draw).astype("float64")


def check_state(layer, reference, rtol=1e-5, atol=1e-5):
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


def run_steps(layer, reference, batches):
    for batch in batches:
        layer.reset_logged_values()
        output = layer(batch, training=True)
        quantized, loss, perplexity, usage = reference(batch)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(output), quantized, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(layer.losses[0]), loss, rtol=1e-5, atol=1e-7
        )
        logged = layer.logged_values()
        np.testing.assert_allclose(
            logged[f"{layer.name}_perplexity"], perplexity, rtol=1e-5
        )
        np.testing.assert_allclose(logged[f"{layer.name}_usage"], usage)
        check_state(layer, reference)


def blobs(rng, rows, shape=None, centers=4, dim=D):
    """Well separated clusters (k-means has a clear answer, no near ties)."""
    means = 3.0 * rng.normal(size=(centers, dim))
    x = means[rng.integers(0, centers, rows)] + 0.1 * rng.normal(size=(rows, dim))
    return x.astype("float32").reshape(shape or x.shape)


# ---- kmeans_init --------------------------------------------------------------


@pytest.mark.parametrize("decay, iters", [(0.99, 10), (0.5, 3)])
def test_kmeans_init_then_ema_matches_numpy_over_steps(decay, iters, rng):
    layer = VectorQuantizerEMA(
        K, D, decay=decay, kmeans_init=True, kmeans_iters=iters, seed=0
    )
    batches = [blobs(rng, 20, (4, 5, D)) for _ in range(4)]
    layer.build(batches[0].shape)
    assert not value_of(layer.initialized)
    reference = NumpyVQ(value_of(layer.embeddings), decay, kmeans_iters=iters)
    run_steps(layer, reference, batches)
    assert value_of(layer.initialized)
    assert value_of(layer.counter) == 5  # the k-means step counts as the first


def test_kmeans_clusters_survive_the_first_ema_step(rng):
    """vector-quantize-pytorch#66: the next EMA step keeps the k-means codebook."""
    x = blobs(rng, 60, centers=K)
    layer = VectorQuantizerEMA(K, D, kmeans_init=True, seed=0)
    means, sizes = numpy_kmeans(x.astype("float64"), K, 10)
    layer(x, training=True)  # k-means, then one EMA step on the same batch
    # Same assignment: N_k = (g c_k + c_k) / (1 + g) = c_k, M_k = c_k mean_k.
    np.testing.assert_allclose(value_of(layer.ema_cluster_size), sizes, rtol=1e-5)
    np.testing.assert_allclose(value_of(layer.embeddings), means, rtol=1e-4, atol=1e-4)
    plain = VectorQuantizerEMA(K, D, seed=0)
    plain(x, training=True)
    assert np.abs(value_of(plain.embeddings) - means).max() > 0.5  # the contrast


def test_kmeans_with_fewer_vectors_than_codes_repeats_rows(rng):
    x = rng.normal(size=(4, D)).astype("float32")  # n = 4 < K = 6
    layer = VectorQuantizerEMA(K, D, kmeans_init=True, seed=0)
    reference = NumpyVQ(initial_embeddings(), 0.99, kmeans_iters=10)
    run_steps(layer, reference, [x, x[::-1].copy(), x * 2.0])
    # Repeated starts: two codes per row at most, the second never chosen.
    assert np.sum(reference.cluster_size > 0) <= 4


def test_kmeans_runs_once_not_in_inference_and_again_after_reset(rng):
    x, y = blobs(rng, 16), blobs(rng, 16)
    layer = VectorQuantizerEMA(K, D, kmeans_init=True, seed=0)
    layer(x, training=False)
    layer.freeze_state()
    layer(x, training=True)
    assert not value_of(layer.initialized), "inference or a frozen call initialised"
    layer.unfreeze_state()
    layer(x, training=True)
    after_x = value_of(layer.embeddings)
    layer(y, training=True)  # no second k-means: an EMA step of y
    reference = NumpyVQ(initial_embeddings(), 0.99, kmeans_iters=10)
    reference(x)
    reference(y)
    check_state(layer, reference)
    layer.reset_state()
    assert not value_of(layer.initialized)
    layer(x, training=True)
    np.testing.assert_array_equal(value_of(layer.embeddings), after_x)


def test_kmeans_initialized_flag_is_saved(rng, tmp_path):
    x = blobs(rng, 16, (8, 2, D))
    layer = VectorQuantizerEMA(K, D, kmeans_init=True, seed=0)
    model = vq_model(layer, (2, D))
    model.fit(x, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = tmp_path / "vq.keras"
    model.save(path)
    loaded = keras.saving.load_model(path).layers[-1]
    assert value_of(loaded.initialized)
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(state_snapshot(loaded)[name], value)


# ---- use_cosine_sim -------------------------------------------------------------


@pytest.mark.parametrize("kmeans", [False, True])
def test_cosine_sim_matches_numpy_over_steps(kmeans, rng):
    layer = VectorQuantizerEMA(
        K, D, use_cosine_sim=True, kmeans_init=kmeans, decay=0.9, seed=0
    )
    batches = [rng.normal(size=(6, 2, D)).astype("float32") for _ in range(4)]
    layer.build(batches[0].shape)
    initial = value_of(layer.embeddings)
    np.testing.assert_allclose(np.linalg.norm(initial, axis=1), 1.0, rtol=1e-6)
    reference = NumpyVQ(initial, 0.9, cosine=True, kmeans_iters=10 if kmeans else None)
    run_steps(layer, reference, batches)
    norms = np.linalg.norm(value_of(layer.embeddings), axis=1)
    used = reference.cluster_size > 1e-3
    np.testing.assert_allclose(norms[used], 1.0, rtol=1e-5)


def test_cosine_sim_output_and_reset_are_unit_vectors(rng):
    x = 5.0 * rng.normal(size=(8, D)).astype("float32")
    layer = VectorQuantizerEMA(K, D, use_cosine_sim=True, seed=0)
    output = keras.ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_allclose(np.linalg.norm(output, axis=1), 1.0, rtol=1e-5)
    layer(x, training=True)
    layer.reset_state()
    np.testing.assert_allclose(
        np.linalg.norm(value_of(layer.embeddings), axis=1), 1.0, rtol=1e-6
    )


# ---- threshold_ema_dead_code ----------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True])
def test_dead_code_restarts_match_numpy_over_steps(cosine, rng):
    embeddings = initial_embeddings(8, 4)
    layer = VectorQuantizerEMA(
        8, 4, decay=0.8, threshold_ema_dead_code=1.5, use_cosine_sim=cosine, seed=0
    )
    layer.build((None, 4))
    reference = NumpyVQ(embeddings, 0.8, cosine=cosine, threshold=1.5)
    restarted = 0
    for _ in range(5):
        draws = layer_draws(layer)  # before the step advances the seed
        reference.draws = lambda draws=draws: draws
        batch = clustered(rng, embeddings, 12, spread=0.1)  # codes 0-3
        run_steps(layer, reference, [batch])
        restarted += reference.dead.sum()
        # The restarted codes hold their batch vector after the step.
        rows = unit(batch) if cosine else batch
        for row in value_of(layer.embeddings)[reference.dead]:
            assert np.min(np.abs(rows - row).max(1)) < 1e-6
    assert restarted >= 4, "the test must restart codes"
    np.testing.assert_array_equal(value_of(layer.restart_seed)[1], 5)


def test_restart_is_not_undone_by_the_next_ema_step(rng):
    """encodec#61: a restart resets the code's EMA, so the next step builds on it."""
    embeddings = initial_embeddings(8, 4)
    x = clustered(rng, embeddings, 16)  # only codes 0-3 used
    layer = VectorQuantizerEMA(8, 4, threshold_ema_dead_code=0.5, seed=0, decay=0.9)
    layer(x, training=True)
    restarted = value_of(layer.embeddings)[4:]
    np.testing.assert_allclose(value_of(layer.ema_dw)[4:], 0.5 * restarted, rtol=1e-6)
    # A batch of exactly the restarted vectors: each code that the search
    # picks (the first of equal codes) keeps its vector.
    layer(restarted, training=True)
    first = [i for i in range(4) if not any((restarted[:i] == restarted[i]).all(1))]
    np.testing.assert_allclose(
        value_of(layer.embeddings)[4:][first], restarted[first], rtol=1e-4
    )


def test_restart_threshold_is_a_deprecated_alias():
    with pytest.warns(FutureWarning, match="threshold_ema_dead_code=2.0"):
        old = VectorQuantizerEMA(K, D, restart_threshold=2.0, seed=0)
    new = VectorQuantizerEMA(K, D, threshold_ema_dead_code=2.0, seed=0)
    assert old.threshold_ema_dead_code == new.restart_threshold == 2.0
    assert old.get_config() == {**new.get_config(), "name": old.name}
    assert "restart_threshold" not in new.get_config()
    with pytest.raises(ValueError, match=r"both threshold_ema_dead_code=1\.0 and"):
        VectorQuantizerEMA(K, D, threshold_ema_dead_code=1.0, restart_threshold=1.0)
    # A config saved before the rename loads quietly.
    legacy = {**new.get_config(), "restart_threshold": 2.0}
    del legacy["threshold_ema_dead_code"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = VectorQuantizerEMA.from_config(legacy)
    assert loaded.threshold_ema_dead_code == 2.0


# ---- contract, arguments ---------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"kmeans_init": True}, {"use_cosine_sim": True, "kmeans_init": True}],
    ids=["kmeans", "cosine_kmeans"],
)
def test_state_contract(options, rng):
    x = blobs(rng, 16, (8, 2, D))
    check_state_contract(
        lambda: VectorQuantizerEMA(K, D, seed=0, **options), x, atol=1e-5
    )


def test_state_contract_with_all_options(rng):
    x = blobs(rng, 16, (8, 2, D))
    check_state_contract(
        lambda: VectorQuantizerEMA(
            K,
            D,
            seed=0,
            kmeans_init=True,
            use_cosine_sim=True,
            threshold_ema_dead_code=1.0,
        ),
        x,
        jit_compile_modes=("auto",),
        mixed_precision_policies=("mixed_bfloat16",),
        atol=1e-5,
    )


def test_bad_option_arguments_are_refused():
    with pytest.raises(TypeError, match=r"kmeans_init must be True or False.*'yes'"):
        VectorQuantizerEMA(K, D, kmeans_init="yes")
    with pytest.raises(TypeError, match=r"use_cosine_sim must be True or False.*1"):
        VectorQuantizerEMA(K, D, use_cosine_sim=1)
    with pytest.raises(ValueError, match=r"kmeans_iters=0.*kmeans_iters=10"):
        VectorQuantizerEMA(K, D, kmeans_iters=0)
    with pytest.raises(ValueError, match=r"threshold_ema_dead_code=-1"):
        VectorQuantizerEMA(K, D, threshold_ema_dead_code=-1.0)


def test_option_config_round_trip():
    layer = VectorQuantizerEMA(
        K,
        D,
        kmeans_init=True,
        kmeans_iters=4,
        use_cosine_sim=True,
        threshold_ema_dead_code=0.5,
        seed=1,
    )
    clone = VectorQuantizerEMA.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert (clone.kmeans_iters, clone.use_cosine_sim) == (4, True)
