"""Question 2b: CenterLoss step increment vs batch size (it must stay near linear).

For B = 256, 1,024, 4,096, 16,384 samples, K = 1,000 and 100,000 classes and
D = 128 features, times one `train_on_batch` step (default `jit_compile`) of a
model `[features, labels] -> Dense(D) -> center loss -> Dense(1)` (MSE to
zeros) with `keras_stateful.CenterLoss`, and of the same model without it.
The increment is the time CenterLoss adds to the step: per round, the
median step with it minus the median step without it, the two run back to
back; the figure is the median over rounds (at least 15 rounds, one or more
paired steps each).

The update reads the B features and writes the rows of the classes in the
batch: O(B * D) work, plus O(B log B) for grouping the samples by class (a
sort). Linear work gives 16 from B = 1,024 to B = 16,384 and the sort a
factor of about 1.4; a `(B, B)` same-class matrix gives over 200.

Goal: increment at B = 16,384 ÷ at B = 1,024 <= 25 at K = 1,000, measured
with one intra-op thread (`--threads 1`).

Results go to benchmarks/results/center_loss_batch_sweep_<backend>.json.

    KERAS_BACKEND=jax python benchmarks/center_loss_batch_sweep.py
        [--quick] [--threads N] [--out DIR]
"""

from __future__ import annotations

import statistics

import harness
import keras
import numpy as np

from keras_stateful.layers import CenterLoss

D = 128
GOAL_GROWTH = 25.0
REFERENCE_B = 1_024
WITH, WITHOUT = "with CenterLoss", "without"


def keras_step(batch, num_classes, features, labels, center_loss):
    inputs = [keras.Input((D,)), keras.Input((), dtype="int32")]
    hidden = keras.layers.Dense(D)(inputs[0])
    if center_loss:
        hidden = CenterLoss(num_classes, alpha=0.5)([hidden, inputs[1]])
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile(optimizer="sgd", loss="mse")
    target = np.zeros((batch, 1), "float32")
    return harness.train_step(model, [features, labels], target)


def increment(timed, batch, num_classes):
    """Median over rounds of (round median with - round median without)."""
    with_ = timed[WITH, batch, num_classes]["round_medians_s"]
    without = timed[WITHOUT, batch, num_classes]["round_medians_s"]
    per_round = [a - b for a, b in zip(with_, without, strict=True)]
    return {
        "median_s": statistics.median(per_round),
        "min_s": min(per_round),
        "max_s": max(per_round),
        "rounds": len(per_round),
    }


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    batches = [256, 1_024, 4_096] if args.quick else [256, 1_024, 4_096, 16_384]
    class_counts = [1_000] if args.quick else [1_000, 100_000]
    steps, rounds, warmup = (1, 3, 1) if args.quick else (1, 15, 2)
    min_round_s = 0.0 if args.quick else 0.05
    rng = np.random.default_rng(0)
    variants = {}
    for k in class_counts:
        for b in batches:
            features = rng.normal(size=(b, D)).astype("float32")
            labels = rng.integers(0, k, size=b).astype("int32")
            for name, on in ((WITH, True), (WITHOUT, False)):
                keras.utils.set_random_seed(0)
                variants[name, b, k] = keras_step(b, k, features, labels, on)
    # Each size's pair back to back in every round.
    variants = dict(sorted(variants.items(), key=lambda item: item[0][::-1]))
    timed = harness.time_interleaved(
        variants, steps=steps, rounds=rounds, warmup=warmup, min_round_s=min_round_s
    )
    del variants
    results = [
        {"variant": name, "batch": b, "num_classes": k, **summary}
        for (name, b, k), summary in timed.items()
    ]
    increments = []
    for k in class_counts:
        for b in batches:
            inc = increment(timed, b, k)
            increments.append({"batch": b, "num_classes": k, **inc})
            harness.log(
                f"K={k:>7} B={b:>6}  increment median {harness.ms(inc['median_s'])}"
                f"  (min {harness.ms(inc['min_s'])}, max {harness.ms(inc['max_s'])})"
            )
    by = {(r["batch"], r["num_classes"]): r for r in increments}
    largest, k_goal = max(batches), min(class_counts)
    growth = by[largest, k_goal]["median_s"] / by[REFERENCE_B, k_goal]["median_s"]
    summary = {
        "increment_largest_over_1024": growth,
        "largest_batch": largest,
        "goals_met": growth <= GOAL_GROWTH,
    }
    harness.log(
        f"increment at B={largest} / B={REFERENCE_B} (K={k_goal}): {growth:.1f}x"
        f" (goal <= {GOAL_GROWTH} for B=16,384)"
    )
    record = {
        **harness.metadata(quick=args.quick),
        "D": D,
        "K_goal": k_goal,
        "step": "train_on_batch, default jit_compile",
        "steps_per_round": steps,
        "min_round_s": min_round_s,
        "rounds": rounds,
        "goals": {"increment_largest_over_1024": {"max": GOAL_GROWTH}},
        "results": results,
        "increments": increments,
        "summary": summary,
    }
    harness.write_json(args.out, "center_loss_batch_sweep", record)


if __name__ == "__main__":
    main()
