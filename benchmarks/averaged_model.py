"""Question 6: what does AveragedModel cost per step, against the optimizer's use_ema?

On an MLP of about 5M parameters (`1024 -> 2048 -> 1024 -> 1024 -> 10`, ReLU,
batch 256, Adam), times `model.train_on_batch` with the default `jit_compile`
in five variants, interleaved one step at a time (`harness.time_interleaved`):

- `plain`: the MLP alone;
- `use_ema`: the MLP with `Adam(use_ema=True, ema_momentum=0.999)`, Keras's
  own EMA of the trainable variables;
- `averaged`: the MLP and `AveragedModel(mlp, decay=0.999)` called in the same
  model on the first sample of the batch (so that its forward pass costs
  little beside the update);
- `averaged_no_update`: the same wiring with the wrapper called with
  `training=False` (its one-sample forward pass, no update);
- `averaged_batch`: the wrapper called on the whole batch (a real teacher).

Figures: `averaged_increment_over_use_ema`, `(averaged - plain) / (use_ema -
plain)` per round, the goal (at most 1.2); the update alone, `averaged -
averaged_no_update`; and memory: the bytes of the wrapper's averaged copy over
the float32 bytes of the MLP's variables (exactly 1.0: one extra float32
copy), beside the bytes of `use_ema`'s copies. On PyTorch also the
timm-style update in plain PyTorch, `torch._foreach_lerp_(ema, params, 1 -
decay)` on the same tensors, timed alone, for information.

    KERAS_BACKEND=jax python benchmarks/averaged_model.py [--quick] [--threads N]
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import harness
import keras
import numpy as np

from keras_stateful.layers import AveragedModel

CLASSES = 10
DECAY = 0.999
GOAL_INCREMENT_OVER_USE_EMA = 1.2
GOAL_EXTRA_COPIES = 1.0
VARIANTS = ["plain", "use_ema", "averaged", "averaged_no_update", "averaged_batch"]


class FirstSample(keras.layers.Layer):
    def call(self, x):
        return x[:1]


def mlp(widths: list[int]) -> keras.Sequential:
    layers = [keras.Input((widths[0],))]
    layers += [keras.layers.Dense(w, activation="relu") for w in widths[1:-1]]
    layers.append(keras.layers.Dense(CLASSES))
    return keras.Sequential(layers)


def build(variant: str, widths: list[int]) -> tuple[keras.Model, Any]:
    student = mlp(widths)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if variant in ("plain", "use_ema"):
        optimizer = keras.optimizers.Adam(
            1e-4, use_ema=variant == "use_ema", ema_momentum=DECAY
        )
        student.compile(optimizer=optimizer, loss=loss)
        return student, None
    averaged = AveragedModel(student, decay=DECAY)
    inputs = keras.Input((widths[0],))
    teacher_inputs = inputs if variant == "averaged_batch" else FirstSample()(inputs)
    training = False if variant == "averaged_no_update" else None
    model = keras.Model(
        inputs, [student(inputs), averaged(teacher_inputs, training=training)]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=[loss, None])
    return model, averaged


def nbytes(variables) -> int:
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


def increment_ratio(timed: dict) -> dict:
    """Per round: (averaged - plain) / (use_ema - plain); median and range."""
    rounds = {k: timed[k]["round_medians_s"] for k in timed}
    per_round = [
        (a - p) / (e - p) if e > p else float("inf")
        for a, e, p in zip(
            rounds["averaged"], rounds["use_ema"], rounds["plain"], strict=True
        )
    ]
    finite = [r for r in per_round if np.isfinite(r)] or [float("inf")]
    return {
        "median": statistics.median(finite),
        "round_min": min(finite),
        "round_max": max(finite),
        "rounds_without_use_ema_increment": len(per_round) - len(finite),
    }


def foreach_lerp_seconds(model: keras.Model, repeats: int) -> dict:
    """timm's update in plain PyTorch on the model's own parameter tensors."""
    import torch

    params = [v.value.detach() for v in model.trainable_variables]
    ema = [p.clone() for p in params]
    times = []
    with torch.no_grad():
        for _ in range(repeats + 2):
            start = time.perf_counter()
            torch._foreach_lerp_(ema, params, 1.0 - DECAY)
            times.append(time.perf_counter() - start)
    return harness.summarize(times[2:])


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    if args.quick:
        widths, batch, rounds, warmup = [64, 128, 64, 64, CLASSES], 16, 3, 1
    else:
        widths, batch, rounds, warmup = [1024, 2048, 1024, 1024, CLASSES], 256, 60, 2
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, widths[0])).astype("float32")
    y = rng.integers(0, CLASSES, size=batch).astype("int32")
    runs, models, wrappers = {}, {}, {}
    for variant in VARIANTS:
        models[variant], wrappers[variant] = build(variant, widths)
        runs[variant] = harness.train_step(models[variant], x, y)
    timed = harness.time_interleaved(runs, steps=1, rounds=rounds, warmup=warmup)
    student = wrappers["averaged"].layer
    parameters = sum(int(np.prod(v.shape)) for v in student.trainable_variables)
    extra = nbytes(wrappers["averaged"].averaged_variables) / (
        4 * sum(int(np.prod(v.shape)) for v in student.variables)
    )
    ema_bytes = nbytes(
        [v for v in models["use_ema"].optimizer.variables if "average" in v.path]
    )
    ratios = {
        "averaged_increment_over_use_ema": increment_ratio(timed),
        "averaged_over_plain": harness.ratio(timed["averaged"], timed["plain"]),
        "use_ema_over_plain": harness.ratio(timed["use_ema"], timed["plain"]),
        "update_alone_s": timed["averaged"]["median_s"]
        - timed["averaged_no_update"]["median_s"],
        "averaged_batch_over_plain": harness.ratio(
            timed["averaged_batch"], timed["plain"]
        ),
    }
    memory = {
        "parameters": parameters,
        "averaged_copy_bytes": nbytes(wrappers["averaged"].averaged_variables),
        "extra_float32_copies": extra,
        "use_ema_copy_bytes": ema_bytes,
    }
    record = {
        **harness.metadata(quick=args.quick),
        "step": f"train_on_batch, jit_compile='auto' ({harness.BACKEND})",
        "batch": batch,
        "widths": widths,
        "rounds": rounds,
        "goals": {
            "averaged_increment_over_use_ema": {"max": GOAL_INCREMENT_OVER_USE_EMA},
            "extra_float32_copies": {"max": GOAL_EXTRA_COPIES},
        },
        "results": [{"variant": k, **v} for k, v in timed.items()],
        "ratios": ratios,
        "memory": memory,
    }
    if harness.BACKEND == "torch":
        record["foreach_lerp"] = foreach_lerp_seconds(models["plain"], rounds)
    inc = ratios["averaged_increment_over_use_ema"]["median"]
    harness.log(
        f"{parameters:,} parameters: plain {harness.ms(timed['plain']['median_s'])}, "
        f"use_ema {harness.ms(timed['use_ema']['median_s'])}, "
        f"averaged {harness.ms(timed['averaged']['median_s'])}; increment ratio "
        f"{inc:.2f}; extra float32 copies {extra:.3f}"
    )
    harness.write_json(args.out, "averaged_model", record)


if __name__ == "__main__":
    main()
