"""CenterLoss step time vs number of classes, against the Keras-2 dense rule.

For K classes, D=512 features and B=256 samples, times one `train_on_batch`
step of a model `[features, labels] -> center loss -> Dense(1)` with
keras_stateful's CenterLoss (batch rows only) and with the Keras-2 example's
dense one-hot rule written in `keras.ops` (a (B, K) one-hot and a full (K, D)
rewrite). The first steps (compilation) are skipped; variants are interleaved;
medians and min-max of the per-step time are reported, with the backend,
versions and machine. Results go to benchmarks/results/ as JSON.

    KERAS_BACKEND=jax python benchmarks/center_loss_scaling.py [--quick]
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
from keras_stateful.layers import CenterLoss

D, B = 512, 256


@keras.saving.register_keras_serializable(package="benchmarks")
class DenseOneHotCenterLoss(keras_stateful.StatefulLayer):
    """The Keras-2 example's rule: delta = Y^T (Y C - X) / (1 + Y^T 1), all rows."""

    def __init__(self, num_classes, alpha=0.5, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.alpha = num_classes, alpha

    def build(self, input_shape):
        self.centers = self.add_state("centers", (self.num_classes, input_shape[0][-1]))

    def call(self, inputs, training=None):
        features, labels = inputs
        one_hot = ops.one_hot(labels, self.num_classes)
        own = ops.matmul(one_hot, self.centers)
        self.add_loss(ops.mean(0.5 * ops.sum(ops.square(features - own), axis=-1)))
        delta = ops.matmul(ops.transpose(one_hot), own - features)
        delta = delta / (1 + ops.sum(one_hot, axis=0)[:, None])
        self.commit_state(
            (self.centers, self.centers - self.alpha * delta), training=training
        )
        return features


def model_for(layer):
    inputs = [keras.Input((D,)), keras.Input((), dtype="int32")]
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    model.compile(optimizer="sgd", loss="mse")
    return model


def time_steps(model, batch, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model.train_on_batch(*batch)
        float(np.asarray(loss))  # block until the step is done
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results")
    )
    args = parser.parse_args()
    class_counts = [10, 1_000, 10_000] if args.quick else [10, 1_000, 10_000, 100_000]
    steps, repeats = (5, 2) if args.quick else (20, 3)
    rng = np.random.default_rng(0)
    results = []
    for k in class_counts:
        batch = (
            [
                rng.normal(size=(B, D)).astype("float32"),
                rng.integers(0, k, size=B).astype("int32"),
            ],
            np.zeros((B, 1), "float32"),
        )
        variants = {
            "keras_stateful.CenterLoss": model_for(CenterLoss(k, alpha=0.5)),
            "Keras-2 dense one-hot rule": model_for(DenseOneHotCenterLoss(k)),
        }
        samples = {name: [] for name in variants}
        for model in variants.values():  # warm-up: compile
            time_steps(model, batch, 2)
        for _ in range(repeats):  # interleaved
            for name, model in variants.items():
                samples[name] += time_steps(model, batch, steps)
        for name, times in samples.items():
            results.append(
                {
                    "variant": name,
                    "num_classes": k,
                    "median_s": statistics.median(times),
                    "min_s": min(times),
                    "max_s": max(times),
                    "steps": len(times),
                }
            )
            print(
                f"K={k:>7}  {name:<28} median {1e3 * statistics.median(times):8.2f} ms"
                f"  (min {1e3 * min(times):.2f}, max {1e3 * max(times):.2f})"
            )
    ours = {
        r["num_classes"]: r["median_s"]
        for r in results
        if r["variant"].startswith("keras_s")
    }
    dense = {
        r["num_classes"]: r["median_s"]
        for r in results
        if r["variant"].startswith("Keras-2")
    }
    kmax = max(ours)
    summary = {
        "ours_largest_over_smallest": ours[kmax] / ours[min(ours)],
        "dense_over_ours_at_largest": dense[kmax] / ours[kmax],
    }
    print(
        f"ours K={kmax} / K={min(ours)}: {summary['ours_largest_over_smallest']:.2f}x; "
        f"dense / ours at K={kmax}: {summary['dense_over_ours_at_largest']:.1f}x"
    )
    record = {
        "benchmark": "center_loss_scaling",
        "D": D,
        "B": B,
        "quick": args.quick,
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "keras_stateful": keras_stateful.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "results": results,
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"center_loss_scaling_{keras.backend.backend()}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
