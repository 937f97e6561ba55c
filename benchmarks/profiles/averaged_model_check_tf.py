"""Why AveragedModel's finiteness check on TensorFlow uses `l2_loss`, not XLA.

On the variables of `benchmarks/averaged_model.py`'s 5M-parameter MLP (an
old average and a student value for each, 10M float32 values in all),
times, interleaved, each alone:

- `xla_sum_of_squares`: the sum of squares compiled by XLA
  (`tf.function(jit_compile=True)`), the check before commit 2ee880f;
- `l2_loss`: one `tf.nn.l2_loss` per value, summed, in a `tf.function`
  without XLA, the check since;
- `xla_average`: the write, the average into the variables in one XLA
  computation (as the library's), for scale;
- `keras_ops_average`: `v.assign(v * decay + w * (1 - decay))` per variable
  in a `tf.function` without XLA, which is what the optimizer's `use_ema`
  runs, for scale.

XLA's CPU reduction to one number adds the elements one after another;
TensorFlow's kernel is vectorised. Run it with one thread, as the benchmark:

    KERAS_BACKEND=tensorflow TF_NUM_INTRAOP_THREADS=1 \
        python benchmarks/profiles/averaged_model_check_tf.py [--rounds 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import tensorflow as tf

SHAPES = [(1024, 2048), (2048,), (2048, 1024), (1024,), (1024, 1024), (1024,)]
SHAPES += [(1024, 10), (10,)]
DECAY = 0.999


def xla_sum_of_squares(values: list[tf.Tensor]) -> tf.Tensor:
    return tf.add_n([tf.reduce_sum(x * x) for x in values])


def l2_loss(values: list[tf.Tensor]) -> tf.Tensor:
    return tf.add_n([tf.nn.l2_loss(x) for x in values])


def average(averages: list[tf.Variable], students: list[tf.Tensor]) -> tf.Tensor:
    for variable, student in zip(averages, students, strict=True):
        variable.assign(variable * DECAY + student * (1.0 - DECAY))
    return tf.constant(True)


def variants(averages, students) -> dict:
    checks = {
        "xla_sum_of_squares": tf.function(xla_sum_of_squares, jit_compile=True),
        "l2_loss": tf.function(l2_loss),
    }
    writes = {
        "xla_average": tf.function(average, jit_compile=True),
        "keras_ops_average": tf.function(average),
    }
    values = [*averages, *students]
    runs = {name: (lambda f=f: f(values)) for name, f in checks.items()}
    for name, write in writes.items():
        runs[name] = lambda f=write: f(averages, students)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    rng = np.random.default_rng(0)
    averages = [tf.Variable(rng.normal(size=s).astype("float32")) for s in SHAPES]
    students = [tf.constant(rng.normal(size=s).astype("float32")) for s in SHAPES]
    runs = variants(averages, students)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(2):  # trace and compile: not timed
        for run in runs.values():
            run().numpy()
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run().numpy()
            times[name].append(time.perf_counter() - start)
    count = sum(int(np.prod(s)) for s in SHAPES)
    print(f"TensorFlow {tf.__version__}, {count:,} parameters, {args.rounds} rounds")
    for name, values in times.items():
        print(f"{name:>20}: {statistics.median(values) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
