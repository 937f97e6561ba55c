"""Question 1: what does the state update cost per training step?

For every layer of keras_stateful, in two models (an MLP 512 wide and a small
CNN, batch 256), times the step the user gets, `model.train_on_batch` with
the default `jit_compile` (XLA on JAX, a `tf.function` on TensorFlow since
Keras turns XLA off on CPU-only machines, eager on PyTorch), in five variants:

- `on`: the layer updating its state (training);
- `frozen`: the same model, after one training step, `layer.freeze_state()`
  (as a user freezes a state that has seen data). The frozen switch is
  a variable read in the compiled step, so the step computes the same new
  state and keeps the old one (`where(gate, new, old)`): this variant shows
  what the write itself costs, and `on / frozen` is the goal (<= 1.05);
- `frozen_copy`: a second, separately built frozen model: `frozen_copy /
  frozen` compares two identical programs, so it shows the noise floor of
  the machine (an A/A control) beside `on / frozen`;
- `no_update`: the layer called with `training=False` in the model, so no
  update is traced at all (the compiled step holds only the layer's forward
  pass; eager PyTorch still runs the statistics the layer computes before
  its commit): `on / no_update` is the whole cost of the update;
- `without`: the same model without the layer (and without its wiring).

Models (ReLU, Adam, sparse categorical cross-entropy on 10 classes):

- MLP: `x (512) -> Dense 512 -> [site] -> Dense 512 -> [head] -> Dense 10`
- CNN: `x (28, 28, 1) -> Conv 16 3x3/2 -> [site] -> Conv 32 3x3/2 ->
  global average pool -> [head] -> Dense 10`

A per-sample layer sits at `[site]` (`MovingAverage`, `MovingMoments`,
`RunningStandardization`, `FakeQuant`; `VectorQuantizerEMA` with 512 codes of
64 on the MLP's hidden units seen as 8 vectors, 128 codes of 16 on the CNN's
feature map). `CenterLoss(10)` sits at `[head]` on the penultimate features,
with the labels as a second model input. `MemoryQueue(4096)` sits at
`[head]` in a MoCo-style branch: keys = L2-normalised `Dense 128` of the
features, and an added loss `0.1 * mean(logsumexp(keys @ queue^T / 0.07))`
over the queue it returns; its `without` variant has no branch at all, so
`on / without` there includes the branch's matmul against the queue.

The first steps (compilation) are not timed; the five variants of a layer
take turns one step at a time (`rounds` rounds), so that each ratio compares
steps taken back to back. Results (with
backend, versions, CPU, cores, date) go to
benchmarks/results/update_overhead_<backend>.json.

    KERAS_BACKEND=jax python benchmarks/update_overhead.py
        [--quick] [--threads N] [--out DIR]
"""

from __future__ import annotations

import harness
import keras
import numpy as np
from keras import ops

from keras_stateful.layers import (
    CenterLoss,
    FakeQuant,
    MemoryQueue,
    MovingAverage,
    MovingMoments,
    RunningStandardization,
    VectorQuantizerEMA,
)

CLASSES = 10
GOAL_ON_OVER_FROZEN = 1.05
LAYERS = [
    "MovingAverage",
    "MovingMoments",
    "RunningStandardization",
    "FakeQuant",
    "VectorQuantizerEMA",
    "CenterLoss",
    "MemoryQueue",
]
# --quick: one layer per kind of wiring (site, labels input, branch).
QUICK_LAYERS = ["MovingMoments", "CenterLoss", "MemoryQueue"]
VARIANTS = ["on", "frozen", "frozen_copy", "no_update"]


class QueueContrast(keras.layers.Layer):
    """MoCo-style use of the queue: adds `weight * mean(logsumexp(k Q^T / t))`.

    Returns the features unchanged (the branch only adds the loss).
    """

    def __init__(self, weight=0.1, temperature=0.07, **kwargs):
        super().__init__(**kwargs)
        self.weight, self.temperature = weight, temperature

    def call(self, features, keys, queue):
        logits = ops.matmul(keys, ops.transpose(queue)) / self.temperature
        self.add_loss(self.weight * ops.mean(ops.logsumexp(logits, axis=-1)))
        return features


class L2Normalize(keras.layers.Layer):
    def call(self, x):
        return x / ops.maximum(ops.norm(x, axis=-1, keepdims=True), 1e-12)


def site_layer(name, arch, width):
    """The layer at `[site]` and the shapes around it."""
    if name == "VectorQuantizerEMA":
        if arch == "mlp":
            dim = min(64, width)
            return [
                keras.layers.Reshape((width // dim, dim)),
                VectorQuantizerEMA(512, dim, seed=0),
                keras.layers.Reshape((width,)),
            ], 1
        return [VectorQuantizerEMA(128, 16, seed=0)], 0
    layer = {
        "MovingAverage": MovingAverage,
        "MovingMoments": MovingMoments,
        "RunningStandardization": RunningStandardization,
        "FakeQuant": FakeQuant,
    }[name]()
    return [layer], 0


def build(arch, name, variant, width, quick):
    """(model, stateful layer or None, uses labels input)."""
    if arch == "mlp":
        inputs = keras.Input((width,))
        h = keras.layers.Dense(width, activation="relu")(inputs)
    else:
        inputs = keras.Input((28, 28, 1))
        h = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(inputs)
    labels = keras.Input((), dtype="int32")
    training = False if variant == "no_update" else None
    stateful, with_labels = None, False
    if variant != "without" and name not in ("CenterLoss", "MemoryQueue"):
        layers, index = site_layer(name, arch, width)
        stateful = layers[index]
        for i, layer in enumerate(layers):
            h = layer(h, training=training) if i == index else layer(h)
    if arch == "mlp":
        h = keras.layers.Dense(width, activation="relu")(h)
    else:
        h = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
    if variant != "without" and name == "CenterLoss":
        stateful = CenterLoss(CLASSES, alpha=0.5, loss_weight=0.01)
        h = stateful([h, labels], training=training)
        with_labels = True
    if variant != "without" and name == "MemoryQueue":
        stateful = MemoryQueue(256 if quick else 4096)
        keys = L2Normalize()(keras.layers.Dense(128)(h))
        queue = stateful(keys, training=training)
        h = QueueContrast()(h, keys, queue)
    outputs = keras.layers.Dense(CLASSES)(h)
    model = keras.Model([inputs, labels] if with_labels else inputs, outputs)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model, stateful, with_labels


def data(arch, batch, width, rng):
    if arch == "mlp":
        x = rng.normal(size=(batch, width)).astype("float32")
    else:
        x = rng.random(size=(batch, 28, 28, 1)).astype("float32")
    y = rng.integers(0, CLASSES, size=batch).astype("int32")
    return x, y


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    if args.quick:
        archs, width, batch = ["mlp"], 64, 32
        steps, rounds, warmup = 1, 3, 1
    else:
        archs, width, batch = ["mlp", "cnn"], 512, 256
        steps, rounds, warmup = 1, 100, 2  # 100 timed steps per variant
    rng = np.random.default_rng(0)
    results, ratios = [], {}
    for arch in archs:
        keras.utils.set_random_seed(0)
        x, y = data(arch, batch, width, rng)
        without, _, _ = build(arch, None, "without", width, args.quick)
        without_step = harness.train_step(without, x, y)
        for name in QUICK_LAYERS if args.quick else LAYERS:
            runs = {}
            for variant in VARIANTS:
                model, layer, with_labels = build(
                    arch, name, variant.removesuffix("_copy"), width, args.quick
                )
                inputs = [x, y] if with_labels else x
                if variant.startswith("frozen"):
                    # Frozen after one training step, as a user freezes a
                    # state that has seen data (a FakeQuant frozen before
                    # any batch has no range and would compute on other
                    # values); the switch takes effect in the compiled step.
                    model.train_on_batch(inputs, y)
                    layer.freeze_state()
                runs[variant] = harness.train_step(model, inputs, y)
            runs["without"] = without_step
            timed = harness.time_interleaved(
                runs, steps=steps, rounds=rounds, warmup=warmup
            )
            for variant, summary in timed.items():
                results.append(
                    {"model": arch, "layer": name, "variant": variant, **summary}
                )
            ratio = {
                f"on_over_{other}": harness.ratio(timed["on"], timed[other])
                for other in ("frozen", "no_update", "without")
            }
            ratio["frozen_copy_over_frozen"] = harness.ratio(
                timed["frozen_copy"], timed["frozen"]
            )
            ratio["goal_met"] = ratio["on_over_frozen"]["median"] <= GOAL_ON_OVER_FROZEN
            ratios[f"{arch}/{name}"] = ratio
            harness.log(
                f"{arch} {name:<23} on {harness.ms(timed['on']['median_s'])}"
                f"  on/frozen {ratio['on_over_frozen']['median']:.3f}"
                f"  (A/A {ratio['frozen_copy_over_frozen']['median']:.3f})"
                f"  on/no_update {ratio['on_over_no_update']['median']:.3f}"
                f"  on/without {ratio['on_over_without']['median']:.3f}"
            )
    record = {
        **harness.metadata(quick=args.quick),
        "step": {
            "jax": "train_on_batch, jit_compile='auto' (XLA)",
            "tensorflow": "train_on_batch, jit_compile='auto' (tf.function, "
            "no XLA on CPU-only machines)",
            "torch": "train_on_batch, jit_compile='auto' (eager)",
        }[harness.BACKEND],
        "batch": batch,
        "mlp_width": width,
        "memory_queue_size": 256 if args.quick else 4096,
        "steps_per_round": steps,
        "rounds": rounds,
        "goals": {"on_over_frozen": {"max": GOAL_ON_OVER_FROZEN}},
        "results": results,
        "ratios": ratios,
    }
    harness.write_json(args.out, "update_overhead", record)


if __name__ == "__main__":
    main()
