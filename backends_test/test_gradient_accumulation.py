"""With gradient accumulation, state updates per micro-batch, weights per step.

`optimizer=SGD(..., gradient_accumulation_steps=k)` applies the weights'
update every `k` batches. The layers' state is not the optimizer's: every
training forward call updates it, so it moves once per micro-batch, with
the weights of that micro-batch, as `torch.nn.BatchNorm` does under manual
accumulation (pytorch/pytorch#46516). This is the decided behaviour
(docs/guarantees.md).
"""

import keras
import numpy as np

from backends_test import all_layers
from backends_test.helpers import value_of

ACCUMULATE = 2
BATCHES = 4


class Recorder(keras.callbacks.Callback):
    """The Dense weights before each batch and the counters after it."""

    def __init__(self):
        super().__init__()
        self.weights_before, self.counters_after = [], []

    def on_train_batch_begin(self, batch, logs=None):
        dense = self.model.get_layer("dense")
        self.weights_before.append([value_of(w) for w in dense.weights])

    def on_train_batch_end(self, batch, logs=None):
        self.counters_after.append(
            {
                name: int(value_of(getattr(self.model.get_layer(name), counter)))
                for name, counter in all_layers.COUNTERS.items()
                if name in {layer.name for layer in self.model.layers}
            }
        )


def fit_accumulating(model):
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=ACCUMULATE),
        loss="mse",
    )
    x = all_layers.data(BATCHES)
    recorder = Recorder()
    model.fit(
        x,
        all_layers.targets(len(x[0])),
        batch_size=all_layers.BATCH,
        shuffle=False,
        verbose=0,
        callbacks=[recorder],
    )
    dense = model.get_layer("dense")
    final = [value_of(w) for w in dense.weights]
    return x, recorder, final


def test_every_layer_updates_per_micro_batch_and_weights_per_optimizer_step():
    model = all_layers.every_layer_model()
    _, recorder, final = fit_accumulating(model)
    # State: one update per batch, in every layer.
    for step, counters in enumerate(recorder.counters_after, start=1):
        assert counters == dict.fromkeys(all_layers.COUNTERS, step)
    queue = model.get_layer("queue")
    assert int(value_of(queue.filled)) == min(
        BATCHES * all_layers.BATCH, all_layers.QUEUE_SIZE
    )
    # Weights: changed by the batches that end an accumulation (2 and 4) only.
    snapshots = [*recorder.weights_before, final]
    changed = [
        not all(
            np.array_equal(a, b)
            for a, b in zip(snapshots[i], snapshots[i + 1], strict=True)
        )
        for i in range(BATCHES)
    ]
    assert changed == [(i + 1) % ACCUMULATE == 0 for i in range(BATCHES)]
    # Keras counts optimizer steps, the layers count micro-batches.
    assert int(value_of(model.optimizer.iterations)) == BATCHES // ACCUMULATE
    for layer in all_layers.stateful_layers(model):
        assert layer.skipped_updates == 0


def test_state_follows_each_micro_batch_with_the_weights_it_ran_with():
    model = all_layers.one_layer_model("moving_average")
    x, recorder, _ = fit_accumulating(model)
    # MovingAverage(0.9, zero_debias=True) after the Dense: its average is
    # the debiased EMA of the 4 micro-batch means of the Dense output.
    hidden = np.zeros(all_layers.FEATURES)
    batches = np.split(x[0].astype("float64"), BATCHES)
    for step, (batch, (kernel, bias)) in enumerate(
        zip(batches, recorder.weights_before, strict=True), start=1
    ):
        hidden = 0.9 * hidden + 0.1 * (batch @ kernel + bias).mean(0)
        average = hidden / (1 - 0.9**step)
    layer = model.get_layer("average")
    np.testing.assert_allclose(value_of(layer.average), average, rtol=1e-5, atol=1e-6)
    assert int(value_of(layer.counter)) == BATCHES
