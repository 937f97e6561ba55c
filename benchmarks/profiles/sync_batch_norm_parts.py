"""Where SyncBatchNormalization's eager PyTorch time goes, one part at a time.

Times one layer's forward and backward pass (`training=True`) against
`keras.layers.BatchNormalization`'s on the same batch, interleaved, one
thread, and prints the median per-round ratio with one part switched off:

- `none`: nothing switched off;
- `commit`: `commit_state` does nothing (no checks, guard, counter, write);
- `hook`: no backward-safety hook (`protect_state_reads`);
- `moments`: Keras's `ops.moments` (`E[x**2] - E[x]**2`) for the centred
  variance.

Each switch breaks a guarantee: this is a profile, not a variant to use.

    KERAS_BACKEND=torch python benchmarks/profiles/sync_batch_norm_parts.py \
        [--part none|commit|hook|moments] [--shape 256,512] [--rounds 800]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import keras
import numpy as np
import torch
from keras import ops

from keras_stateful import _backend, stateful_layer
from keras_stateful.layers import SyncBatchNormalization


def switch_off(part: str) -> None:
    if part == "commit":
        stateful_layer.StatefulLayer.commit_state = lambda self, *u, **k: None
    elif part == "hook":
        _backend.protect_state_reads = lambda layer: contextlib.nullcontext()
    elif part == "moments":
        SyncBatchNormalization._global_moments = lambda self, x, mask: ops.moments(
            x, axes=self._reduction_axes
        )


def median_ratio(shape: tuple[int, ...], rounds: int) -> float:
    data = np.random.default_rng(0).normal(size=shape).astype("float32")
    x = torch.tensor(data, requires_grad=True)
    layers = [
        keras.layers.BatchNormalization(momentum=0.99),
        SyncBatchNormalization(momentum=0.99),
    ]
    ratios = []
    for round_ in range(rounds):
        times = []
        for layer in layers:
            start = time.perf_counter()
            layer(x, training=True).sum().backward()
            times.append(time.perf_counter() - start)
        if round_ >= rounds // 10:  # warm-up rounds left out
            ratios.append(times[1] / times[0])
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="256,512")
    parser.add_argument("--rounds", type=int, default=800)
    parser.add_argument("--part", default="none")
    args = parser.parse_args()
    torch.set_num_threads(1)
    switch_off(args.part)
    shape = tuple(int(n) for n in args.shape.split(","))
    ratio = median_ratio(shape, args.rounds)
    print(f"shape {shape}, {args.part} switched off: sync / keras {ratio:.3f}")


if __name__ == "__main__":
    main()
