"""Question 6: SyncBatchNormalization against Keras's BatchNormalization, one device.

On one device SyncBatchNormalization communicates nothing, so its training
step should cost what `keras.layers.BatchNormalization`'s does: the goal is
at most 1.05 times (`sync_over_keras`, the worse of the two models). Two models,
each trained with `train_on_batch` (default `jit_compile`), SGD (lr 0.01),
momentum 0.99, the normalization being the only difference:

- `cnn`: `x (16, 16, 32) -> Conv2D 32 3x3 -> [norm] -> ReLU -> global
  average pooling -> Dense 10`, batch 64;
- `mlp`: `x (512) -> Dense 512 -> [norm] -> ReLU -> Dense 10`, batch 256.

Variants take turns one step at a time; the first steps (compilation) are
not timed. Results go to
benchmarks/results/sync_batch_norm_overhead_<backend>.json.

    KERAS_BACKEND=jax python benchmarks/sync_batch_norm_overhead.py
        [--quick] [--threads N] [--out DIR]
"""

from __future__ import annotations

import harness
import keras
import numpy as np

from keras_stateful.layers import SyncBatchNormalization

CLASSES, LR, MOMENTUM, GOAL = 10, 0.01, 0.99, 1.05
NORMS = {
    "keras_batch_norm": lambda: keras.layers.BatchNormalization(momentum=MOMENTUM),
    "sync_batch_norm": lambda: SyncBatchNormalization(momentum=MOMENTUM),
}


def model(kind: str, norm: str, size: int) -> keras.Model:
    if kind == "cnn":
        inputs = keras.Input((size, size, 32))
        h = keras.layers.Conv2D(32, 3, use_bias=False)(inputs)
        h = keras.layers.ReLU()(NORMS[norm]()(h))
        h = keras.layers.GlobalAveragePooling2D()(h)
    else:
        inputs = keras.Input((size,))
        h = keras.layers.Dense(size, use_bias=False)(inputs)
        h = keras.layers.ReLU()(NORMS[norm]()(h))
    built = keras.Model(inputs, keras.layers.Dense(CLASSES)(h))
    built.compile(
        optimizer=keras.optimizers.SGD(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return built


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    if args.quick:
        shapes = {"cnn": (8, 8), "mlp": (64, 16)}  # (size, batch)
        rounds, warmup = 3, 1
    else:
        shapes = {"cnn": (16, 64), "mlp": (512, 256)}
        rounds, warmup = 150, 2
    rng = np.random.default_rng(0)
    results, ratios = [], {}
    for kind, (size, batch) in shapes.items():
        shape = (batch, size, size, 32) if kind == "cnn" else (batch, size)
        x = rng.normal(size=shape).astype("float32")
        y = rng.integers(0, CLASSES, size=batch).astype("int32")
        variants = {}
        for norm in NORMS:
            keras.utils.set_random_seed(0)
            variants[norm] = harness.train_step(model(kind, norm, size), x, y)
        timed = harness.time_interleaved(
            variants, steps=1, rounds=rounds, warmup=warmup
        )
        ratios[kind] = harness.ratio(
            timed["sync_batch_norm"], timed["keras_batch_norm"]
        )
        for norm, summary in timed.items():
            harness.log(
                f"{kind:<4} {norm:<18} median {harness.ms(summary['median_s'])}"
            )
            results.append({"model": kind, "variant": norm, "batch": batch, **summary})
        harness.log(f"{kind:<4} sync ÷ keras {ratios[kind]['median']:.3f}")
    worst = max(ratios, key=lambda kind: ratios[kind]["median"])
    record = {
        **harness.metadata(quick=args.quick),
        "momentum_keras_convention": MOMENTUM,
        "step": "train_on_batch, default jit_compile",
        "rounds": rounds,
        "goals": {"sync_over_keras": {"max": GOAL}},
        "results": results,
        "ratios": ratios,
        "sync_over_keras": {"model": worst, **ratios[worst]},
    }
    harness.write_json(args.out, "sync_batch_norm_overhead", record)


if __name__ == "__main__":
    main()
