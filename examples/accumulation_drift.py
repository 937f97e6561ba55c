"""How far moving statistics drift from full-batch training under accumulation.

Trains the same model three ways on the same data, with weights that do not
move (learning rate 0), so that only the statistics differ:

- full batch: batches of 64, the reference;
- micro-batches of 16 with `gradient_accumulation_steps=4`, every micro-batch
  updating the statistics (`accumulation_steps=1`, the default);
- the same micro-batches with `keras_stateful.set_accumulation_steps(model)`:
  one update per optimizer step, from the whole effective batch.

It prints the largest difference of `MovingMoments`' moving mean and
variance from the full-batch run. Run it with any backend:

    KERAS_BACKEND=jax python examples/accumulation_drift.py
"""

from __future__ import annotations

import keras
import numpy as np

import keras_stateful

EFFECTIVE_BATCH, MICRO_BATCHES = 64, 4


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    # Uneven micro-batches: the features drift within the epoch.
    x = rng.normal(size=(512, 8)) * np.linspace(0.5, 3.0, 512)[:, None] + 2.0
    return x.astype("float32"), np.zeros((512, 1), "float32")


def train(batch_size: int, accumulate: bool) -> dict[str, np.ndarray]:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    moments = keras_stateful.layers.MovingMoments(momentum=0.9, name="moments")
    model = keras.Model(inputs, keras.layers.Dense(1)(moments(inputs)))
    steps = EFFECTIVE_BATCH // batch_size
    optimizer = keras.optimizers.SGD(
        0.0, gradient_accumulation_steps=steps if steps > 1 else None
    )
    model.compile(optimizer=optimizer, loss="mse")
    if accumulate:
        keras_stateful.set_accumulation_steps(model)
    x, y = data()
    model.fit(x, y, batch_size=batch_size, shuffle=False, verbose=0)
    return {
        "mean": keras.ops.convert_to_numpy(moments.moving_mean),
        "variance": keras.ops.convert_to_numpy(moments.moving_variance),
    }


def drift(run: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(run[k] - reference[k]))) for k in reference)


def main() -> dict[str, float]:
    reference = train(EFFECTIVE_BATCH, accumulate=False)
    micro = EFFECTIVE_BATCH // MICRO_BATCHES
    drifts = {
        "every micro-batch updates": drift(train(micro, False), reference),
        "accumulated, one update per step": drift(train(micro, True), reference),
    }
    print(f"backend {keras.backend.backend()}, max |difference| from full batch:")
    for name, value in drifts.items():
        print(f"  {name:34s} {value:.2e}")
    return drifts


if __name__ == "__main__":
    main()
