"""How far MovingMoments' eager PyTorch update is from its floor.

Times, interleaved, one thread, on a `(256, 512)` batch in training mode
under `no_grad` (as `native_comparison.py` times the update alone), and
prints each median over `torch.nn.BatchNorm1d`'s:

- `moving_moments`: `keras_stateful.layers.MovingMoments(momentum=0.99)`;
- `bare_kernels`: a Keras layer that runs only the kernels MovingMoments'
  update runs (the shift, the batch-statistics kernel, two `lerp`s, the
  finiteness sum, three copies) with none of the base class's checks,
  freeze switch, skip counter or validation: what the update would cost if
  all of its Python were free;
- `keras_identity`: a Keras layer that returns its input: the cost of a
  Keras layer call;
- `keras_batch_norm`: `keras.layers.BatchNormalization(momentum=0.99)`;
- `torch_batch_norm`: `torch.nn.BatchNorm1d(512, momentum=0.01,
  affine=False)`, the unit.

`bare_kernels` keeps no guarantee: this is a profile, not a variant to use.

    KERAS_BACKEND=torch python benchmarks/profiles/moving_moments_floor.py \
        [--rounds 1500]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import keras
import numpy as np
import torch

from keras_stateful.layers import MovingMoments


class BareKernels(keras.layers.Layer):
    """MovingMoments' update kernels, nothing else (no guarantee kept)."""

    def build(self, input_shape):
        features = (input_shape[-1],)
        self.mean = self.add_weight(
            shape=features, initializer="zeros", trainable=False
        )
        self.variance = self.add_weight(
            shape=features, initializer="ones", trainable=False
        )
        self.count = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", trainable=False
        )

    def call(self, inputs, training=None):
        shift = inputs[0]
        offset, variance = torch.batch_norm_update_stats(
            inputs - shift, None, None, 0.0
        )
        mean = torch.lerp(self.mean._value, shift + offset, 0.01)
        variance = torch.lerp(self.variance._value, variance, 0.01)
        if math.isfinite(torch.cat([mean, variance]).sum(dtype=torch.float64)):
            self.mean._value.copy_(mean)
            self.variance._value.copy_(variance)
            self.count._value.add_(1)
        return inputs


class Identity(keras.layers.Layer):
    def call(self, inputs, training=None):
        return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = torch.tensor(np.maximum(rng.normal(size=(256, 512)), 0).astype("float32"))
    layers = {
        "moving_moments": MovingMoments(momentum=0.99),
        "bare_kernels": BareKernels(),
        "keras_identity": Identity(),
        "keras_batch_norm": keras.layers.BatchNormalization(momentum=0.99),
        "torch_batch_norm": torch.nn.BatchNorm1d(512, momentum=0.01, affine=False),
    }
    times: dict[str, list[float]] = {name: [] for name in layers}
    with torch.no_grad():
        for layer in layers.values():
            layer(x, training=True) if isinstance(layer, keras.Layer) else layer(x)
        for _ in range(args.rounds):
            for name, layer in layers.items():
                start = time.perf_counter()
                if isinstance(layer, keras.Layer):
                    layer(x, training=True)
                else:
                    layer(x)
                times[name].append(time.perf_counter() - start)
    unit = statistics.median(times["torch_batch_norm"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<17} {median * 1e3:.3f} ms  {median / unit:.2f}x BatchNorm1d")


if __name__ == "__main__":
    main()
