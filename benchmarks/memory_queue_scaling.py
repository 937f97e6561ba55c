"""Question 3: MemoryQueue enqueue time vs queue size, against a whole rewrite.

For a queue of K keys, D=128 and B=256, times one `train_on_batch` step (the
default `jit_compile`: XLA on JAX, a `tf.function` on TensorFlow, eager on
PyTorch) of a model `keys -> scale -> queue -> score`, where the score is
computed from the keys alone, so that the step's cost is the enqueue's.
Variants:

- `MemoryQueue`: keras_stateful's layer (writes the B rows at the pointer,
  a row commit); the queue it returns is not read.
- `MemoryQueue + read`: the same, with the score also reading one row of the
  returned queue. The returned queue is the one before the enqueue, so a
  backend that writes the state in place must then keep a copy of the old
  queue: the explicit copy on PyTorch, XLA's copy insertion on JAX.
- `whole-queue rewrite`: the same ring buffer committing the whole `(K, D)`
  queue (`scatter_update` of the B rows into it, then a full commit), as a
  layer that assigns `queue` whole does; its queue is not read.

Goal: MemoryQueue at 65,536 / at 1,024 <= 1.3.

The first steps (compilation) are not timed; all variants and sizes take
turns in rounds (each runs `steps` steps a round, a fast one more, up to
`min_round_s` seconds); medians and min-max of the per-step time, and ratios
as medians of per-round ratios, are reported with the backend, versions and
machine. Results go to
benchmarks/results/memory_queue_scaling_<backend>.json.

    KERAS_BACKEND=jax python benchmarks/memory_queue_scaling.py
        [--quick] [--threads N] [--out DIR]
"""

from __future__ import annotations

import harness
import keras
import numpy as np
from keras import ops

import keras_stateful
from keras_stateful import _backend
from keras_stateful.layers.memory_queue import MemoryQueue

D, B = 128, 256
SIZES = [1_024, 4_096, 16_384, 65_536]
GOAL_GROWTH = 1.3
OURS, OURS_READ, WHOLE = "MemoryQueue", "MemoryQueue + read", "whole-queue rewrite"


class WholeQueueRewrite(keras_stateful.StatefulLayer):
    """The same ring buffer, committing the whole (K, D) queue every step."""

    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        self.size = size

    def build(self, input_shape):
        self.queue = self.add_state("queue", (self.size, input_shape[-1]))
        self.pointer = self.add_state("pointer", (), dtype="int32")

    def call(self, keys, training=None):
        queue = _backend.read_value(self.queue)
        pointer = _backend.read_value(self.pointer)
        batch = ops.shape(keys)[0]
        slots = ops.mod(pointer + ops.arange(batch, dtype="int32"), self.size)
        new_queue = ops.scatter_update(queue, slots[:, None], ops.cast(keys, "float32"))
        self.commit_state(
            (self.queue, new_queue),
            (self.pointer, ops.mod(pointer + batch, self.size)),
            training=training,
        )
        return ops.copy(queue)


class Scale(keras.layers.Layer):
    """Multiplies by one trainable scalar: the step's gradient path."""

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


class Score(keras.layers.Layer):
    """One score per key from the keys (and the queue's first row): O(B * D)."""

    def __init__(self, read_queue, **kwargs):
        super().__init__(**kwargs)
        self.read_queue = read_queue

    def call(self, queue, keys):
        score = ops.mean(keys, axis=-1, keepdims=True)
        if self.read_queue:
            score = score + ops.mean(queue[:1])
        return score


def model_for(layer, read_queue=False):
    inputs = keras.Input((D,))
    keys = Scale()(inputs)
    model = keras.Model(inputs, Score(read_queue)(layer(keys), keys))
    model.compile(optimizer="sgd", loss="mse")
    return model


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    sizes = [SIZES[0], SIZES[-1]] if args.quick else SIZES
    # >= 60 timed steps per variant; a fast one runs more, >= 30 ms per round.
    steps, rounds, warmup = (2, 2, 1) if args.quick else (3, 20, 2)
    min_round_s = 0.0 if args.quick else 0.03
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, D)).astype("float32")
    y = np.zeros((B, 1), "float32")
    variants = {}
    for size in sizes:  # all sizes in one interleaved run
        for name, layer, read in [
            (OURS, MemoryQueue(size), False),
            (OURS_READ, MemoryQueue(size), True),
            (WHOLE, WholeQueueRewrite(size), False),
        ]:
            variants[name, size] = harness.train_step(model_for(layer, read), x, y)
    variants = dict(sorted(variants.items()))  # a variant's sizes back to back
    timed = harness.time_interleaved(
        variants, steps=steps, rounds=rounds, warmup=warmup, min_round_s=min_round_s
    )
    del variants
    results = []
    for (name, size), summary in timed.items():
        results.append({"variant": name, "size": size, **summary})
        harness.log(
            f"K={size:>6}  {name:<20} median {harness.ms(summary['median_s'])}"
            f"  (min {harness.ms(summary['min_s'])},"
            f" max {harness.ms(summary['max_s'])})"
        )
    big, small = max(sizes), min(sizes)
    pairs = {
        "ours_largest_over_smallest": ((OURS, big), (OURS, small)),
        "ours_read_largest_over_smallest": ((OURS_READ, big), (OURS_READ, small)),
        "whole_largest_over_smallest": ((WHOLE, big), (WHOLE, small)),
        "whole_over_ours_at_largest": ((WHOLE, big), (OURS, big)),
    }
    ratios = {key: harness.ratio(timed[a], timed[b]) for key, (a, b) in pairs.items()}
    summary = {key: value["median"] for key, value in ratios.items()}
    summary["ratios"] = ratios
    summary["goals_met"] = summary["ours_largest_over_smallest"] <= GOAL_GROWTH
    harness.log(
        f"K={big} / K={small}: MemoryQueue "
        f"{summary['ours_largest_over_smallest']:.2f}x (goal <= {GOAL_GROWTH}), "
        f"+ read {summary['ours_read_largest_over_smallest']:.2f}x, "
        f"whole-queue rewrite {summary['whole_largest_over_smallest']:.1f}x; "
        f"rewrite / MemoryQueue at K={big}: "
        f"{summary['whole_over_ours_at_largest']:.1f}x"
    )
    record = {
        **harness.metadata(quick=args.quick),
        "D": D,
        "B": B,
        "step": "train_on_batch, default jit_compile",
        "steps_per_round": steps,
        "min_round_s": min_round_s,
        "rounds": rounds,
        "goals": {"ours_largest_over_smallest": {"max": GOAL_GROWTH}},
        "results": results,
        "summary": summary,
    }
    harness.write_json(args.out, "memory_queue_scaling", record)


if __name__ == "__main__":
    main()
