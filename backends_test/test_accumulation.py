"""`accumulation_steps=N`: one state update per window, from the whole effective batch.

A layer with `accumulation_steps=N` (or set from the optimizer with
`keras_stateful.set_accumulation_steps`) adds up its sufficient statistics
over `N` micro-batches and commits once: the state after each window equals
one update with the window's micro-batches concatenated, within 1e-5, eagerly
and in `fit` with `gradient_accumulation_steps=N` on every backend.
"""

import keras
import numpy as np
import pytest

import keras_stateful
from backends_test.helpers import value_of
from keras_stateful.layers import (
    FakeQuant,
    MemoryQueue,
    MovingAverage,
    MovingMoments,
    RunningStandardization,
    VectorQuantizerEMA,
)
from keras_stateful.testing import state_snapshot

N = 3  # micro-batches per window
B = 8  # rows per micro-batch
WINDOW_STATE = ("window_step", "accumulated_")

#: Layers whose rule has sufficient statistics, by name: factory(steps).
ACCUMULATING = {
    "moving_average": lambda n: MovingAverage(
        0.9, zero_debias=True, accumulation_steps=n
    ),
    "moving_moments": lambda n: MovingMoments(momentum=0.9, accumulation_steps=n),
    "moving_moments_torch": lambda n: MovingMoments(
        momentum=None, unbiased=True, accumulation_steps=n
    ),
    "running_standardization": lambda n: RunningStandardization(accumulation_steps=n),
    "fake_quant": lambda n: FakeQuant(
        8, axis=-1, averaging_constant=0.1, accumulation_steps=n
    ),
    "vector_quantizer_ema": lambda n: VectorQuantizerEMA(
        6, 4, decay=0.9, seed=0, accumulation_steps=n
    ),
}


def test_center_loss_moves_centers_once_per_window():
    from keras_stateful.layers import CenterLoss

    def centers(steps):
        return CenterLoss(3, alpha=0.5, accumulation_steps=steps)

    accumulating, reference = centers(N), centers(1)
    data = windows(2)
    labels = np.random.default_rng(3).integers(0, 3, size=(2, N, B))
    for window, ids in zip(data, labels, strict=True):
        for micro, micro_ids in zip(window[:-1], ids[:-1], strict=True):
            accumulating([micro, micro_ids], training=True)
        accumulating([window[-1], ids[-1]], training=True)
        reference([np.concatenate(list(window)), ids.reshape(-1)], training=True)
        assert_close_state(rule_state(accumulating), rule_state(reference), "centers")


def rule_state(layer):
    """The layer's own state, without the window's accumulators and counter."""
    return {
        name: value
        for name, value in state_snapshot(layer).items()
        if not name.startswith(WINDOW_STATE)
    }


def windows(count, seed=0, offset=1.0):
    rng = np.random.default_rng(seed)
    return rng.normal(offset, 2.0, size=(count, N, B, 4)).astype("float32")


def assert_close_state(actual, expected, what):
    assert actual.keys() == expected.keys(), what
    for name in expected:
        np.testing.assert_allclose(
            actual[name],
            expected[name],
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"{what}: {name}",
        )


@pytest.mark.parametrize("name", ACCUMULATING)
def test_each_window_equals_one_update_with_the_concatenated_batch(name):
    accumulating, reference = ACCUMULATING[name](N), ACCUMULATING[name](1)
    data = windows(2)
    accumulating.build(data[0, 0].shape)
    reference.build(data[0, 0].shape)
    for window in data:
        start = state_snapshot(accumulating)
        for micro in window[:-1]:
            accumulating(micro, training=True)
            # Mid-window nothing of the rule moves; inference touches nothing.
            assert_close_state(rule_state(accumulating), rule_state_of(start), "mid")
            before = state_snapshot(accumulating)
            accumulating(micro, training=False)
            assert_identical(state_snapshot(accumulating), before)
        accumulating(window[-1], training=True)
        reference(np.concatenate(list(window)), training=True)
        assert_close_state(rule_state(accumulating), rule_state(reference), name)
        assert int(value_of(accumulating.window_step_variable)) == 0
    assert accumulating.skipped_updates == 0


def rule_state_of(snapshot):
    return {k: v for k, v in snapshot.items() if not k.startswith(WINDOW_STATE)}


def assert_identical(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_accumulators_are_state_and_listed():
    layer = MovingAverage(0.9, accumulation_steps=2)
    layer.build((None, 3))
    names = [v.name for v in layer.state_variables]
    assert {"window_step", "accumulated_sum", "accumulated_count"} <= set(names)
    assert MovingAverage(0.9).get_config()["accumulation_steps"] == 1
    assert MovingAverage.from_config(layer.get_config()).accumulation_steps == 2


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4"])
def test_accumulation_steps_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=r"accumulation_steps must be an int >= 1.*"):
        MovingAverage(0.9, accumulation_steps=bad)


def test_a_non_finite_micro_batch_is_left_out_of_its_window():
    layer, reference = MovingAverage(0.9, accumulation_steps=N), MovingAverage(0.9)
    first, bad, last = windows(1)[0]
    bad = bad.copy()
    bad[0, 0] = np.nan
    for micro in (first, bad, last):
        layer(micro, training=True)
    reference(np.concatenate([first, last]), training=True)
    assert layer.skipped_updates == 1
    assert_close_state(rule_state(layer), rule_state(reference), "NaN left out")
    assert int(value_of(layer.window_step_variable)) == 0  # the window still closed


def test_freeze_state_pauses_an_open_window():
    layer, reference = MovingAverage(0.9, accumulation_steps=N), MovingAverage(0.9)
    a, b, c = windows(1)[0]
    layer(a, training=True)
    paused = state_snapshot(layer)
    layer.freeze_state()
    layer(np.full_like(b, 100.0), training=True)
    assert_identical(state_snapshot(layer), paused)
    layer.unfreeze_state()
    layer(b, training=True)
    layer(c, training=True)
    reference(np.concatenate([a, b, c]), training=True)
    assert_close_state(rule_state(layer), rule_state(reference), "after a pause")


def test_reset_state_empties_an_open_window():
    layer, reference = MovingAverage(0.9, accumulation_steps=N), MovingAverage(0.9)
    data = windows(2)
    layer(data[0, 0], training=True)
    layer.reset_state()
    assert int(value_of(layer.window_step_variable)) == 0
    for micro in data[1]:
        layer(micro, training=True)
    reference(np.concatenate(list(data[1])), training=True)
    assert_close_state(rule_state(layer), rule_state(reference), "after reset")


def test_memory_queue_enqueues_every_micro_batch():
    """No sufficient statistics: MoCo enqueues each micro-batch's keys."""
    layer = MemoryQueue(32, accumulation_steps=N)
    for step, micro in enumerate(windows(1)[0], start=1):
        layer(micro, training=True)
        assert int(value_of(layer.filled)) == step * B


def one_layer_fit(name, steps, batch_size):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    layer = ACCUMULATING[name](1)
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    optimizer = keras.optimizers.SGD(0.0, gradient_accumulation_steps=steps)
    model.compile(optimizer=optimizer, loss="mse")
    assert keras_stateful.set_accumulation_steps(model) == (steps or 1)
    x = windows(2).reshape(-1, 4)
    model.fit(x, np.zeros((len(x), 1)), batch_size=batch_size, shuffle=False, verbose=0)
    return layer


@pytest.mark.parametrize("name", ACCUMULATING)
def test_fit_with_gradient_accumulation_updates_once_per_optimizer_step(name):
    accumulated = one_layer_fit(name, N, B)
    full_batch = one_layer_fit(name, None, N * B)
    assert accumulated.accumulation_steps == N
    assert_close_state(rule_state(accumulated), rule_state(full_batch), f"fit {name}")


def test_averaged_model_steps_once_per_window():
    """DINO's teacher: one EMA step per optimizer step, not per micro-batch."""
    from keras_stateful.layers import AveragedModel

    student = keras.layers.Dense(2, kernel_initializer="ones")
    teacher = AveragedModel(student, decay=0.5, accumulation_steps=N)
    x = windows(1)[0]
    for micro in x:
        teacher(micro, training=True)
        student.kernel.assign(student.kernel * 2.0)  # an optimizer would wait
    assert int(value_of(teacher.step)) == 1
    assert int(value_of(teacher.num_updates)) == 1
    # The one update copied the student as the last micro-batch read it.
    np.testing.assert_allclose(
        value_of(teacher.averaged_variables[0]), np.full((4, 2), 4.0), rtol=1e-6
    )


def test_percentile_normalization_steps_once_per_window_with_mean_percentiles():
    """No sufficient statistics: the mean of the micro-batches' percentiles."""
    from keras_stateful.layers import PercentileNormalization

    layer = PercentileNormalization(rate=0.5, accumulation_steps=N)
    x = windows(1)[0]
    for micro in x:
        layer(micro, training=True)
    low = np.mean([np.percentile(m, 5) for m in x])
    high = np.mean([np.percentile(m, 95) for m in x])
    np.testing.assert_allclose(value_of(layer.lo), 0.5 * low, rtol=1e-5)
    np.testing.assert_allclose(value_of(layer.hi), 0.5 * high, rtol=1e-5)


def test_vq_kmeans_runs_on_the_first_micro_batch_then_one_ema_step_per_window():
    layer = VectorQuantizerEMA(
        6, 4, decay=0.9, seed=0, kmeans_init=True, accumulation_steps=2
    )
    first, second, third = windows(1)[0]
    layer(first, training=True)
    initial_codebook = value_of(layer.embeddings)
    # K-means is committed at once (counter 1, as a first observation) while
    # the window of the EMA step stays open.
    assert bool(value_of(layer.initialized))
    assert int(value_of(layer.counter)) == 1
    assert int(value_of(layer.window_step_variable)) == 1
    layer(second, training=True)
    assert int(value_of(layer.counter)) == 2  # one EMA step for the window
    assert int(value_of(layer.window_step_variable)) == 0
    assert not np.array_equal(value_of(layer.embeddings), initial_codebook)
    layer(third, training=True)
    assert int(value_of(layer.counter)) == 2  # the next window is open
