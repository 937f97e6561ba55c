"""ResidualVectorQuantizer against a NumPy stack of the single-stage reference.

The reference is a list of `NumpyVQ` (Sonnet's rule, with the options of
`test_vector_quantizer_options.py`), stage `i` fed `r_i = x - q_0 - ... -
q_{i-1}`; the output is the sum of the stages' codes and the loss the sum of
their commitment losses.
"""

import keras
import numpy as np
import pytest

import keras_stateful
from backends_test.helpers import value_of
from backends_test.test_stateful_layer import input_gradient
from backends_test.test_vector_quantizer_options import NumpyVQ, blobs
from backends_test.test_vector_quantizer_options import check_state as check_stage
from keras_stateful.layers import ResidualVectorQuantizer, VectorQuantizerEMA
from keras_stateful.testing import check_state_contract, state_snapshot
from keras_stateful.testing.state_contract import ContractScale

Q, K, D = 3, 5, 4


class NumpyRVQ:
    def __init__(self, layer, decay, **options):
        self.stages = [
            NumpyVQ(value_of(stage.embeddings), decay, **options)
            for stage in layer.quantizers
        ]

    def __call__(self, x, training=True):
        residual = x.astype("float64")
        total = np.zeros_like(residual)
        stats = []
        for stage in self.stages:
            quantized, loss, perplexity, usage = stage(residual, training)
            stats.append((loss, perplexity, usage))
            total += quantized
            residual = residual - quantized
        return total, stats


def run_steps(layer, reference, batches):
    for batch in batches:
        for stage in layer.quantizers:
            stage.reset_logged_values()
        output = layer(batch, training=True)
        total, stats = reference(batch)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(output), total, rtol=1e-5, atol=1e-5
        )
        losses = [float(keras.ops.convert_to_numpy(loss)) for loss in layer.losses]
        np.testing.assert_allclose(losses, [s[0] for s in stats], rtol=1e-4, atol=1e-7)
        for stage, (loss, perplexity, usage) in zip(
            layer.quantizers, stats, strict=True
        ):
            logged = stage.logged_values()
            np.testing.assert_allclose(
                logged[f"{stage.name}_perplexity"], perplexity, rtol=1e-5
            )
            np.testing.assert_allclose(logged[f"{stage.name}_usage"], usage)
            np.testing.assert_allclose(
                logged[f"{stage.name}_commitment_loss"], loss, rtol=1e-4, atol=1e-7
            )
        for stage, expected in zip(layer.quantizers, reference.stages, strict=True):
            check_stage(stage, expected)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"kmeans_init": True},
        {"kmeans_init": True, "use_cosine_sim": True},
    ],
    ids=["sonnet", "kmeans", "kmeans_cosine"],
)
def test_matches_a_numpy_stack_of_single_stages_over_steps(options, rng):
    layer = ResidualVectorQuantizer(Q, K, D, decay=0.8, seed=0, **options)
    batches = [blobs(rng, 24, (4, 6, D), dim=D) for _ in range(4)]
    layer.build(batches[0].shape)
    numpy_options = {
        "kmeans_iters": 10 if options.get("kmeans_init") else None,
        "cosine": options.get("use_cosine_sim", False),
    }
    reference = NumpyRVQ(layer, 0.8, **numpy_options)
    run_steps(layer, reference, batches)


def test_stages_are_vector_quantizers_with_their_own_codebooks():
    layer = ResidualVectorQuantizer(Q, K, D, seed=7, name="rvq")
    layer.build((None, D))
    assert all(isinstance(s, VectorQuantizerEMA) for s in layer.quantizers)
    assert [s.name for s in layer.quantizers] == ["rvq_0", "rvq_1", "rvq_2"]
    assert [s.seed for s in layer.quantizers] == [7, 8, 9]
    codebooks = [value_of(s.embeddings) for s in layer.quantizers]
    assert not np.array_equal(codebooks[0], codebooks[1])
    assert len(layer.state_variables) == Q * 6


def test_residuals_shrink_with_each_stage(rng):
    x = rng.normal(size=(256, D)).astype("float32")
    layer = ResidualVectorQuantizer(4, 16, D, kmeans_init=True, seed=0)
    layer(x, training=True)  # k-means on the first batch, stage by stage
    residual, errors = x, []
    for stage in layer.quantizers:
        residual = residual - keras.ops.convert_to_numpy(stage(residual))
        errors.append(np.mean(residual**2))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0]


def test_one_straight_through_estimator_over_the_stack(rng):
    x = rng.normal(size=(5, 2, D)).astype("float32")
    layer = ResidualVectorQuantizer(Q, K, D, seed=0)
    layer.build(x.shape)
    # d sum(output) / dx is 1, not Q (one estimator, not one per stage).
    np.testing.assert_array_equal(input_gradient(layer, x), np.ones_like(x))


def test_commitment_losses_reach_the_input_through_the_residuals(rng):
    x = rng.normal(size=(8, D)).astype("float32")
    inputs = keras.Input((D,))
    layer = ResidualVectorQuantizer(2, K, D, commitment_cost=1.0, seed=0)
    model = keras.Model(inputs, layer(ContractScale()(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    scale = model.layers[1].trainable_variables[0]
    model.fit(x, batch_size=8, verbose=0)  # loss: only the commitment losses
    assert float(value_of(scale)) != 1.0, "no gradient from the stages' losses"


def test_logged_values_per_stage_in_fit_history(rng):
    x = blobs(rng, 32, (16, 2, D), dim=D)
    inputs = keras.Input((2, D))
    layer = ResidualVectorQuantizer(2, K, D, seed=0, name="rvq")
    model = keras.Model(inputs, layer(ContractScale()(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    history = model.fit(
        x, batch_size=16, verbose=0, callbacks=[keras_stateful.LogLayerValues()]
    ).history
    for stage in ("rvq_0", "rvq_1"):
        for key in ("perplexity", "usage", "commitment_loss"):
            assert np.isfinite(history[f"{stage}_{key}"][0]), (stage, key)
    total = history["rvq_0_commitment_loss"][0] + history["rvq_1_commitment_loss"][0]
    np.testing.assert_allclose(history["loss"][0], total, rtol=1e-4)


def test_freeze_reset_and_inference_reach_every_stage(rng):
    x = rng.normal(size=(8, D)).astype("float32")
    layer = ResidualVectorQuantizer(Q, K, D, seed=0)
    layer.build(x.shape)
    initial = state_snapshot(layer)
    layer(x, training=False)
    layer.freeze_state()
    assert layer.state_frozen and all(s.state_frozen for s in layer.quantizers)
    layer(x, training=True)
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, initial[name], err_msg=name)
    layer.unfreeze_state()
    layer(x, training=True)
    assert value_of(layer.quantizers[-1].counter) == 1
    layer.reset_state()
    for name, value in state_snapshot(layer).items():
        np.testing.assert_array_equal(value, initial[name], err_msg=name)


def test_mixed_precision_keeps_float32_residuals(rng):
    keras.config.set_dtype_policy("mixed_bfloat16")
    x = rng.normal(size=(8, D)).astype("float32")
    layer = ResidualVectorQuantizer(Q, K, D, seed=0)
    output = layer(x, training=True)
    assert keras.backend.standardize_dtype(output.dtype) == "bfloat16"
    assert {s.compute_dtype for s in layer.quantizers} == {"float32"}
    assert {v.dtype for v in layer.state_variables} == {"float32", "int32"}


def test_state_contract(rng):
    x = blobs(rng, 16, (8, 2, D), dim=D)
    check_state_contract(lambda: ResidualVectorQuantizer(Q, K, D, seed=0), x)


def test_state_contract_with_options(rng):
    x = blobs(rng, 16, (8, 2, D), dim=D)
    check_state_contract(
        lambda: ResidualVectorQuantizer(
            2, K, D, seed=0, kmeans_init=True, threshold_ema_dead_code=0.5
        ),
        x,
        jit_compile_modes=("auto",),
        mixed_precision_policies=("mixed_bfloat16",),
        atol=1e-5,
    )


def test_bad_input_and_arguments_say_what_to_write(rng):
    with pytest.raises(ValueError, match=r"\(batch, \.\.\., 4\).*\(3, 5\).*Dense\(4\)"):
        ResidualVectorQuantizer(Q, K, D)(rng.normal(size=(3, 5)).astype("float32"))
    with pytest.raises(TypeError, match=r"floating point.*received dtype int32"):
        ResidualVectorQuantizer(Q, K, D)(np.zeros((2, D), "int32"))
    with pytest.raises(ValueError, match=r"num_quantizers=0"):
        ResidualVectorQuantizer(0, K, D)
    with pytest.raises(ValueError, match=r"decay=1\.0"):
        ResidualVectorQuantizer(Q, K, D, decay=1.0)
    with pytest.raises(TypeError, match=r"kmeans_init must be True or False"):
        ResidualVectorQuantizer(Q, K, D, kmeans_init="yes")


def test_config_round_trip():
    layer = ResidualVectorQuantizer(
        Q,
        K,
        D,
        commitment_cost=0.5,
        decay=0.9,
        threshold_ema_dead_code=1.0,
        kmeans_init=True,
        kmeans_iters=3,
        use_cosine_sim=True,
        embeddings_initializer="glorot_uniform",
        seed=3,
        accumulation_steps=2,
    )
    clone = ResidualVectorQuantizer.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    stage = clone.quantizers[1]
    assert (stage.kmeans_iters, stage.use_cosine_sim, stage.seed) == (3, True, 4)
    assert stage.accumulation_steps == 2 and stage.threshold_ema_dead_code == 1.0
