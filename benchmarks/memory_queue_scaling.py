"""MemoryQueue enqueue time vs queue size, against a whole-queue rewrite.

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

The first steps (compilation) are skipped; variants are interleaved; medians
and min-max of the per-step time are reported, with the backend, versions
and machine. Results go to benchmarks/results/ as JSON.

    KERAS_BACKEND=jax python benchmarks/memory_queue_scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time

import keras
import numpy as np
from keras import ops

import keras_stateful
from keras_stateful import _backend
from keras_stateful.layers.memory_queue import MemoryQueue

D, B = 128, 256
SIZES = [1_024, 4_096, 16_384, 65_536]


@keras.saving.register_keras_serializable(package="benchmarks")
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


@keras.saving.register_keras_serializable(package="benchmarks")
class Scale(keras.layers.Layer):
    """Multiplies by one trainable scalar: the step's gradient path."""

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


@keras.saving.register_keras_serializable(package="benchmarks")
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
    return model, layer


def block(layer):
    """Wait for the step's state writes too (JAX dispatches asynchronously)."""
    if keras.backend.backend() == "jax":
        import jax

        jax.block_until_ready([v.value for v in layer.state_variables])


def time_steps(model, layer, batch, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model.train_on_batch(*batch)
        float(np.asarray(loss))  # block until the step is done
        block(layer)
        times.append(time.perf_counter() - start)
    return times


def cpu_name():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions():
    found = {"keras": keras.__version__, "keras_stateful": keras_stateful.__version__}
    backend = keras.backend.backend()
    module = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}[backend]
    found[module] = __import__(module).__version__
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results")
    )
    args = parser.parse_args()
    steps, repeats = (5, 2) if args.quick else (20, 3)
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(B, D)).astype("float32"), np.zeros((B, 1), "float32"))
    results = []
    for size in SIZES:
        variants = {
            "MemoryQueue": model_for(MemoryQueue(size)),
            "MemoryQueue + read": model_for(MemoryQueue(size), read_queue=True),
            "whole-queue rewrite": model_for(WholeQueueRewrite(size)),
        }
        samples = {name: [] for name in variants}
        for model, layer in variants.values():  # warm-up: compile
            time_steps(model, layer, batch, 2)
        for _ in range(repeats):  # interleaved
            for name, (model, layer) in variants.items():
                samples[name] += time_steps(model, layer, batch, steps)
        for name, times in samples.items():
            results.append(
                {
                    "variant": name,
                    "size": size,
                    "median_s": statistics.median(times),
                    "min_s": min(times),
                    "max_s": max(times),
                    "steps": len(times),
                }
            )
            print(
                f"K={size:>6}  {name:<20} median {1e3 * statistics.median(times):8.3f}"
                f" ms  (min {1e3 * min(times):.3f}, max {1e3 * max(times):.3f})"
            )
    median = {(r["variant"], r["size"]): r["median_s"] for r in results}
    largest, smallest = max(SIZES), min(SIZES)

    def growth(variant):
        return median[variant, largest] / median[variant, smallest]

    summary = {
        "ours_largest_over_smallest": growth("MemoryQueue"),
        "ours_read_largest_over_smallest": growth("MemoryQueue + read"),
        "whole_largest_over_smallest": growth("whole-queue rewrite"),
        "whole_over_ours_at_largest": median["whole-queue rewrite", largest]
        / median["MemoryQueue", largest],
        "goal_ours_largest_over_smallest": 1.3,
    }
    print(
        f"K={largest} / K={smallest}: MemoryQueue "
        f"{summary['ours_largest_over_smallest']:.2f}x (goal <= 1.3), "
        f"+ read {summary['ours_read_largest_over_smallest']:.2f}x, "
        f"whole-queue rewrite {summary['whole_largest_over_smallest']:.1f}x; "
        f"rewrite / MemoryQueue at K={largest}: "
        f"{summary['whole_over_ours_at_largest']:.1f}x"
    )
    record = {
        "benchmark": "memory_queue_scaling",
        "D": D,
        "B": B,
        "quick": args.quick,
        "step": "train_on_batch, default jit_compile",
        "backend": keras.backend.backend(),
        "versions": versions(),
        "keras": keras.__version__,
        "keras_stateful": keras_stateful.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "results": results,
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"memory_queue_scaling_{keras.backend.backend()}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
