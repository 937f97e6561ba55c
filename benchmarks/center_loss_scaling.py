"""Question 2: CenterLoss step time vs number of classes, against the dense rules.

For K = 10, 1k, 10k, 100k classes, D = 512 features and B = 256 samples,
times one `train_on_batch` step (default `jit_compile`) of a model
`[features, labels] -> center loss -> Dense(1)` (MSE to zeros) with:

- `keras_stateful.CenterLoss`: the batch's rows only (segment sums over the
  batch, a row gather and a row scatter);
- `Keras-2 dense one-hot rule`: the classic Keras-2 example's rule
  (handongfeng/MNIST-center-loss), `delta = Y^T (Y C - X) / (1 + Y^T 1)` with
  a `(B, K)` one-hot `Y`, and a full `(K, D)` rewrite of the centers, written
  in `keras.ops` on the same base class;
- on PyTorch only, `plain PyTorch (KaiyangZhou style)`: a center loss written
  here from the published formula of KaiyangZhou/pytorch-center-loss, in
  plain PyTorch without Keras: the `(B, K)` distance matrix `||x||^2 +
  ||c||^2 - 2 x C^T`, masked by the labels, clamped and summed, the centers
  an `nn.Parameter` trained by SGD (lr 0.5, gradient rescaled by
  `1 / weight`), beside a `Linear(D, 1)` trained by SGD; one step is
  `zero_grad`, forward, `backward`, both optimizers' `step`.

Goals: ours at 100k / ours at 10 <= 1.5; dense rule / ours at 100k >= 10.

The first steps (compilation) are not timed; all variants and sizes take
turns in rounds (each runs `steps` steps a round, a fast one more, up to
`min_round_s` seconds); medians and min-max of the per-step time, and ratios
as medians of per-round ratios, are reported with the backend, versions and
machine. Results go to
benchmarks/results/center_loss_scaling_<backend>.json.

    KERAS_BACKEND=jax python benchmarks/center_loss_scaling.py
        [--quick] [--threads N] [--out DIR]
"""

from __future__ import annotations

import harness
import keras
import numpy as np
from keras import ops

import keras_stateful
from keras_stateful.layers import CenterLoss

D, B = 512, 256
GOAL_GROWTH, GOAL_SPEEDUP = 1.5, 10.0
OURS = "keras_stateful.CenterLoss"
DENSE = "Keras-2 dense one-hot rule"
TORCH = "plain PyTorch (KaiyangZhou style)"


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


def keras_step(layer, features, labels):
    inputs = [keras.Input((D,)), keras.Input((), dtype="int32")]
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))
    model.compile(optimizer="sgd", loss="mse")
    return harness.train_step(model, [features, labels], np.zeros((B, 1), "float32"))


def torch_step(num_classes, features, labels, weight=1.0):
    """A plain-PyTorch training step with a KaiyangZhou-style center loss."""
    import torch

    torch.manual_seed(0)
    centers = torch.nn.Parameter(torch.randn(num_classes, D))
    head = torch.nn.Linear(D, 1)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01)
    optimizer_centers = torch.optim.SGD([centers], lr=0.5)
    x = torch.as_tensor(features)
    y = torch.as_tensor(labels).long()
    target = torch.zeros(B, 1)
    classes = torch.arange(num_classes).long()

    def center_loss(x, y):
        batch = x.shape[0]
        distances = (
            x.pow(2).sum(dim=1, keepdim=True).expand(batch, num_classes)
            + centers.pow(2).sum(dim=1, keepdim=True).expand(num_classes, batch).t()
        )
        distances = torch.addmm(distances, x, centers.t(), beta=1, alpha=-2)
        mask = (
            y.unsqueeze(1)
            .expand(batch, num_classes)
            .eq(classes.expand(batch, num_classes))
        )
        return (distances * mask.float()).clamp(min=1e-12, max=1e12).sum() / batch

    def run():
        optimizer.zero_grad()
        optimizer_centers.zero_grad()
        loss = torch.nn.functional.mse_loss(head(x), target)
        loss = loss + weight * center_loss(x, y)
        loss.backward()
        optimizer.step()
        centers.grad.mul_(1.0 / weight)
        optimizer_centers.step()
        return float(loss.detach())

    return run


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    class_counts = [10, 1_000] if args.quick else [10, 1_000, 10_000, 100_000]
    # >= 20 timed steps per variant; a fast one runs more, >= 50 ms per round.
    steps, rounds, warmup = (2, 2, 1) if args.quick else (2, 10, 2)
    min_round_s = 0.0 if args.quick else 0.05
    rng = np.random.default_rng(0)
    variants = {}
    for k in class_counts:  # all sizes in one interleaved run
        features = rng.normal(size=(B, D)).astype("float32")
        labels = rng.integers(0, k, size=B).astype("int32")
        keras.utils.set_random_seed(0)
        variants[OURS, k] = keras_step(CenterLoss(k, alpha=0.5), features, labels)
        variants[DENSE, k] = keras_step(DenseOneHotCenterLoss(k), features, labels)
        if harness.BACKEND == "torch":
            variants[TORCH, k] = torch_step(k, features, labels)
    variants = dict(sorted(variants.items()))  # a variant's sizes back to back
    timed = harness.time_interleaved(
        variants, steps=steps, rounds=rounds, warmup=warmup, min_round_s=min_round_s
    )
    del variants
    results = []
    for (name, k), summary in timed.items():
        results.append({"variant": name, "num_classes": k, **summary})
        harness.log(
            f"K={k:>7}  {name:<34} median {harness.ms(summary['median_s'])}"
            f"  (min {harness.ms(summary['min_s'])},"
            f" max {harness.ms(summary['max_s'])})"
        )
    small, large = min(class_counts), max(class_counts)
    ours_growth = harness.ratio(timed[OURS, large], timed[OURS, small])
    dense_speedup = harness.ratio(timed[DENSE, large], timed[OURS, large])
    summary = {
        "ours_largest_over_smallest": ours_growth["median"],
        "dense_over_ours_at_largest": dense_speedup["median"],
        "ratios": {
            "ours_largest_over_smallest": ours_growth,
            "dense_over_ours_at_largest": dense_speedup,
            "dense_largest_over_smallest": harness.ratio(
                timed[DENSE, large], timed[DENSE, small]
            ),
        },
    }
    if harness.BACKEND == "torch":
        for key, (a, b) in {
            "torch_plain_over_ours_at_largest": ((TORCH, large), (OURS, large)),
            "torch_plain_largest_over_smallest": ((TORCH, large), (TORCH, small)),
            "torch_plain_over_ours_at_smallest": ((TORCH, small), (OURS, small)),
        }.items():
            summary["ratios"][key] = harness.ratio(timed[a], timed[b])
            summary[key] = summary["ratios"][key]["median"]
    summary["goals_met"] = (
        summary["ours_largest_over_smallest"] <= GOAL_GROWTH
        and summary["dense_over_ours_at_largest"] >= GOAL_SPEEDUP
    )
    harness.log(
        f"ours K={large} / K={small}: {summary['ours_largest_over_smallest']:.2f}x"
        f" (goal <= {GOAL_GROWTH}); dense / ours at K={large}: "
        f"{summary['dense_over_ours_at_largest']:.1f}x (goal >= {GOAL_SPEEDUP})"
    )
    record = {
        **harness.metadata(quick=args.quick),
        "D": D,
        "B": B,
        "step": "train_on_batch, default jit_compile"
        + ("; plain PyTorch eager step" if harness.BACKEND == "torch" else ""),
        "steps_per_round": steps,
        "min_round_s": min_round_s,
        "rounds": rounds,
        "goals": {
            "ours_largest_over_smallest": {"max": GOAL_GROWTH},
            "dense_over_ours_at_largest": {"min": GOAL_SPEEDUP},
        },
        "results": results,
        "summary": summary,
    }
    harness.write_json(args.out, "center_loss_scaling", record)


if __name__ == "__main__":
    main()
