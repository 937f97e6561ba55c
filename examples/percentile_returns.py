"""REINFORCE with DreamerV3's return normalization, on a corridor with large rewards.

An agent starts at the left end of a corridor of 6 cells and has 12 steps; each
step it moves left or right. Every step spent in the last cell pays 100, every
other step costs 1, so returns-to-go range from about -12 to 700, and their
scale changes as the policy improves. The policy-gradient loss is

    -mean(log pi(a_t | s_t) * (R_t - mean(R_t)) / max(1, hi - lo))

where `lo` and `hi` are the moving 5th and 95th percentiles of the returns that
`PercentileNormalization` keeps (DreamerV3's `S`); the layer's output `(R - lo)
/ max(1, hi - lo)` minus its batch mean is exactly that advantage. With plain
SGD the raw returns would need a learning rate tuned to their scale; the
normalised ones do not.

    KERAS_BACKEND=jax python examples/percentile_returns.py [--iterations 40]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import numpy as np
from keras import ops

import keras_stateful
from keras_stateful.layers import PercentileNormalization

CELLS, HORIZON, EPISODES = 6, 12, 64
# Straight right: the last cell after CELLS - 1 steps, then 100 a step.
BEST = 100 * (HORIZON - CELLS + 2) - (CELLS - 2)


def rollouts(
    policy: keras.layers.Dense, rng: np.random.Generator
) -> tuple[np.ndarray, ...]:
    """EPISODES episodes: one-hot cells, actions and returns-to-go, per step."""
    kernel, bias = (np.asarray(w) for w in policy.get_weights())
    cell = np.zeros(EPISODES, "int64")
    states, actions, rewards = [], [], []
    for _ in range(HORIZON):
        one_hot = np.eye(CELLS, dtype="float32")[cell]
        logits = one_hot @ kernel + bias
        right = 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))
        action = (rng.random(EPISODES) < right).astype("int32")
        cell = np.clip(cell + 2 * action - 1, 0, CELLS - 1)
        states.append(one_hot)
        actions.append(action)
        rewards.append(np.where(cell == CELLS - 1, 100.0, -1.0))
    returns = np.cumsum(np.stack(rewards, 1)[:, ::-1], axis=1)[:, ::-1]
    return (
        np.stack(states, 1).reshape(-1, CELLS),
        np.stack(actions, 1).reshape(-1),
        returns.reshape(-1, 1).astype("float32"),
    )


class PolicyGradientLoss(keras.layers.Layer):
    """Per-step `-log pi(a) * advantage`, the advantage cut from the gradient."""

    def call(self, logits, actions, normalized_returns):
        advantage = normalized_returns[:, 0] - ops.mean(normalized_returns)
        log_probs = ops.log_softmax(logits, axis=-1)
        taken = ops.take_along_axis(
            log_probs, ops.cast(actions, "int32")[:, None], axis=-1
        )[:, 0]
        return -taken * ops.stop_gradient(advantage)


def build_model() -> keras.Model:
    states = keras.Input((CELLS,), name="states")
    actions = keras.Input((), dtype="int32", name="actions")
    returns = keras.Input((1,), name="returns")
    logits = keras.layers.Dense(2, kernel_initializer="zeros", name="policy")(states)
    # Zero-debiased: the first batch's percentiles count in full, so the
    # scale is right from the first step (DreamerV3's own default).
    normalized = PercentileNormalization(debias=True, name="return_norm")(returns)
    loss = PolicyGradientLoss()(logits, actions, normalized)
    model = keras.Model([states, actions, returns], loss)
    # The model's output is the per-step loss; fit minimises its mean.
    model.compile(keras.optimizers.SGD(1.0), loss=lambda _, per_step: per_step)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = build_model()
    policy, norm = model.get_layer("policy"), model.get_layer("return_norm")
    print(f"backend: {keras.backend.backend()}")
    for iteration in range(args.iterations):
        states, actions, returns = rollouts(policy, rng)
        # One gradient step per batch of episodes: the percentiles are taken
        # over all its steps, as DreamerV3 takes them over its batch.
        model.fit(
            [states, actions, returns],
            np.zeros(len(states)),
            batch_size=len(states),
            verbose=0,
        )
        episode_return = returns.reshape(EPISODES, HORIZON)[:, 0].mean()
        if iteration % 5 == 0 or iteration == args.iterations - 1:
            lo = float(ops.convert_to_numpy(norm.lo))
            hi = float(ops.convert_to_numpy(norm.hi))
            print(
                f"iteration {iteration:3d}  mean episode return {episode_return:7.1f}"
                f"  lo {lo:6.1f}  hi {hi:6.1f}"
            )
    states, actions, returns = rollouts(policy, rng)
    final = returns.reshape(EPISODES, HORIZON)[:, 0].mean()
    print(f"final mean episode return {final:.1f} (best possible {BEST})")
    assert keras_stateful.find_stateful_layers(model) == [norm]


if __name__ == "__main__":
    main()
