"""Question 6: what does AveragedModel's update cost per step, against use_ema?

On an MLP of about 5M parameters (`1024 -> 2048 -> 1024 -> 1024 -> 10`, ReLU,
batch 256, Adam), times `model.train_on_batch` with the default `jit_compile`
in five variants, interleaved one step at a time (`harness.time_interleaved`):

- `plain`: the MLP alone;
- `use_ema`: the MLP with `Adam(use_ema=True, ema_momentum=0.999)`, Keras's
  own EMA of the trainable variables;
- `averaged`: the MLP and `AveragedModel(mlp, decay=0.999)` called in the same
  model on the first sample of the batch (so that its forward pass costs
  little beside the update);
- `averaged_no_update`: the same model, with the wrapper's `trainable` set to
  `False` before compiling: its one-sample forward pass and the same wiring,
  no update (the update is not even built);
- `averaged_batch`: the wrapper called on the whole batch (a real teacher);
- `averaged_unguarded`: as `averaged`, with `guard_non_finite=False`: the
  update without its exact finiteness check, for information (the floor of
  the update on this wiring);
- `teacher_in_loss` and `teacher_in_loss_no_update`: Mean Teacher's wiring,
  for information: the same one-sample teacher, whose output minus the
  student's (first sample) is a second output with a mean-squared loss, so
  that the student's gradients wait for the teacher's output; with the
  update, and with the wrapper's `trainable` off.

The headline, `averaged_increment_over_use_ema` (goal: at most 1.2), is the
per-step cost of the averaging update over the per-step cost of use_ema's:
`median(averaged - averaged_no_update) / median(use_ema - plain)`, the
medians taken over the rounds' paired differences (each pair ran back to
back in every round). Two things made the earlier figure unfair, both fixed
here:

- `averaged_no_update` called the wrapper with `training=False` when the
  functional model was built, but a functional model called with
  `training=True` (as `train_on_batch` does) passes that value to every
  layer that takes `training`, so the wrapper updated in that variant too
  and `averaged - averaged_no_update` was noise around zero; `trainable =
  False` on the wrapper removes the update for good;
- the increment was `averaged - plain`, which also counts the wrapper's
  teacher forward pass and the two-output wiring of the model, work use_ema
  does not do (use_ema keeps an average and never runs it); that figure is
  still reported, as `with_teacher_over_use_ema`, for information.

The ratio of the median differences replaces the median of per-round ratios
`(a - p) / (e - p)`, which dropped every round where use_ema's increment
came out at or below zero (a third of them under load) and swung wildly
where it came out small; `ci_low`/`ci_high` give a 90% bootstrap interval
over the rounds (seeded). Also reported: the update alone in seconds, and
memory: the bytes of the wrapper's averaged copy over the float32 bytes of
the MLP's variables (exactly 1.0: one extra float32 copy), beside the bytes
of `use_ema`'s copies. On PyTorch also the timm-style update in plain
PyTorch, `torch._foreach_lerp_(ema, params, 1 - decay)` on the same tensors,
timed alone, for information.

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
VARIANTS = [
    "plain",
    "use_ema",
    "averaged",
    "averaged_no_update",
    "averaged_batch",
    "averaged_unguarded",
    "teacher_in_loss",
    "teacher_in_loss_no_update",
]


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
    averaged = AveragedModel(
        student, decay=DECAY, guard_non_finite=variant != "averaged_unguarded"
    )
    inputs = keras.Input((widths[0],))
    teacher_inputs = inputs if variant == "averaged_batch" else FirstSample()(inputs)
    outputs = student(inputs)
    teacher = averaged(teacher_inputs)
    second_loss = None
    if variant.startswith("teacher_in_loss"):
        teacher = keras.layers.Subtract()([FirstSample()(outputs), teacher])
        second_loss = "mse"
    model = keras.Model(inputs, [outputs, teacher])
    if variant.endswith("no_update"):
        # Not `training=False` in the call above: the functional model passes
        # its own `training=True` on to the wrapper in `train_on_batch`.
        averaged.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=[loss, second_loss])
    return model, averaged


def targets(variant: str, y: np.ndarray) -> Any:
    """`y`, and zeros for the teacher's gap where a loss takes it."""
    if variant.startswith("teacher_in_loss"):
        return [y, np.zeros((1, CLASSES), "float32")]
    return y


def nbytes(variables) -> int:
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


def increments(timed: dict, variant: str, baseline: str) -> list[float]:
    """Per round: variant's median step time minus baseline's (paired)."""
    return [
        a - b
        for a, b in zip(
            timed[variant]["round_medians_s"],
            timed[baseline]["round_medians_s"],
            strict=True,
        )
    ]


def increment_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """median(numerator) / median(denominator), paired per-round differences.

    With a 90% bootstrap interval over the rounds (resampled as pairs of
    rounds, seeded) and the two medians in seconds.
    """
    top, bottom = statistics.median(numerator), statistics.median(denominator)
    rng = np.random.default_rng(0)
    pairs = np.array([numerator, denominator])
    samples = []
    for _ in range(2000):
        pick = pairs[:, rng.integers(0, pairs.shape[1], pairs.shape[1])]
        low = np.median(pick[1])
        samples.append(np.median(pick[0]) / low if low > 0 else np.inf)
    ci_low, ci_high = np.quantile(samples, [0.05, 0.95])
    return {
        "median": top / bottom if bottom > 0 else float("inf"),
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "increment_s": top,
        "reference_increment_s": bottom,
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
        runs[variant] = harness.train_step(models[variant], x, targets(variant, y))
    timed = harness.time_interleaved(runs, steps=1, rounds=rounds, warmup=warmup)
    student = wrappers["averaged"].layer
    parameters = sum(int(np.prod(v.shape)) for v in student.trainable_variables)
    extra = nbytes(wrappers["averaged"].averaged_variables) / (
        4 * sum(int(np.prod(v.shape)) for v in student.variables)
    )
    ema_bytes = nbytes(
        [v for v in models["use_ema"].optimizer.variables if "average" in v.path]
    )
    use_ema_increment = increments(timed, "use_ema", "plain")
    update = increments(timed, "averaged", "averaged_no_update")
    ratios = {
        "averaged_increment_over_use_ema": increment_ratio(update, use_ema_increment),
        "unguarded_increment_over_use_ema": increment_ratio(
            increments(timed, "averaged_unguarded", "averaged_no_update"),
            use_ema_increment,
        ),
        "teacher_in_loss_increment_over_use_ema": increment_ratio(
            increments(timed, "teacher_in_loss", "teacher_in_loss_no_update"),
            use_ema_increment,
        ),
        "with_teacher_over_use_ema": increment_ratio(
            increments(timed, "averaged", "plain"), use_ema_increment
        ),
        "averaged_over_plain": harness.ratio(timed["averaged"], timed["plain"]),
        "use_ema_over_plain": harness.ratio(timed["use_ema"], timed["plain"]),
        "update_alone_s": statistics.median(update),
        "use_ema_increment_s": statistics.median(use_ema_increment),
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
        f"averaged {harness.ms(timed['averaged']['median_s'])}, no update "
        f"{harness.ms(timed['averaged_no_update']['median_s'])}; update "
        f"{harness.ms(ratios['update_alone_s'])} ÷ use_ema's "
        f"{harness.ms(ratios['use_ema_increment_s'])}: {inc:.2f}; extra float32 "
        f"copies {extra:.3f}"
    )
    harness.write_json(args.out, "averaged_model", record)


if __name__ == "__main__":
    main()
