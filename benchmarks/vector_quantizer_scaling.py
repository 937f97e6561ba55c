"""VectorQuantizerEMA step time and peak memory vs codebook size, against one-hot.

For K codes, D=64 and N=8,192 input vectors per step (a `(8, 32, 32, 64)`
encoder output), times one training step of the layer: a training-mode call
that updates the codebook, plus the gradient of `sum(output) + loss` with
respect to the input (what `fit` adds around the layer). The step is
compiled as `fit` compiles it by default: `jax.jit` of `stateless_call` (the
state donated) on JAX, `tf.function(jit_compile=True)` on TensorFlow, eager
on PyTorch. Variants, all with Sonnet's update rule:

- `ours`: keras_stateful's `VectorQuantizerEMA`: per-code counts and sums by
  segment sums over the code ids, and a nearest-code search that holds at
  most ~16.8M distances at a time (chunks of codes, in a loop).
- `one_hot`: the textbook formulation (Sonnet's): the full `(N, K)` distance
  matrix, `encodings = one_hot(z, K)`, `counts = sum(encodings, 0)`,
  `sums = encodings^T @ x`.
- `ours_full_search`: segment sums with the full `(N, K)` distance matrix,
  to separate the two changes.

The first step (compilation) is skipped; variants are interleaved; medians
and min-max of the per-step time are reported, over 21 steps for `ours` and
`one_hot` (6 for the ablation). Peak memory of a step:

- JAX: the compiled step's `memory_analysis()`, `temp + argument + output -
  alias` bytes (XLA's own accounting, exact for the step, no noise);
- TensorFlow and PyTorch: in a fresh subprocess per configuration, with
  glibc told to return freed blocks of 128 KiB or more to the system (so the
  RSS follows the memory in use), the increase of the peak RSS (`VmHWM`,
  reset with `/proc/self/clear_refs` once the step is built; else
  `ru_maxrss`) over the RSS before two steps, after a warm-up step on 4
  vectors. It includes the compilation of the first step (TensorFlow keeps
  a compiled step's buffers for the next ones, so they cannot be seen
  after it); PyTorch has none.

Ratios are ours / one-hot. Results (with backend, versions, CPU, cores, date)
go to benchmarks/results/vector_quantizer_scaling_<backend>.json.

    KERAS_BACKEND=jax python benchmarks/vector_quantizer_scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

import keras
import numpy as np
from keras import ops

import keras_stateful
from keras_stateful.layers.vector_quantizer_ema import VectorQuantizerEMA

D = 64
SHAPE = (8, 32, 32, D)  # N = 8,192 vectors
CODEBOOKS = [512, 2_048, 8_192, 16_384]
ABLATION_STEPS = 2  # per repeat for `ours_full_search`, to keep the run short
# Goal: at the largest K, ours needs at most half the one-hot rule's peak memory.
GOAL_PEAK_MEMORY = 0.5
BACKEND = keras.backend.backend()
# In the RSS probes, glibc returns every block of 128 KiB or more to the system
# when it is freed, so the RSS follows the memory in use (by default freed
# blocks stay resident and later steps reuse them unseen).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


class FullSearchVQ(VectorQuantizerEMA):
    """Segment sums, with the whole (N, K) distance matrix at once."""

    def _codes_per_chunk(self, rows):
        return self.num_embeddings


class OneHotVQ(FullSearchVQ):
    """The textbook statistics: a (N, K) one-hot, its column sums and x^T one-hot."""

    def _code_statistics(self, flat, codes, *, with_sums):
        encodings = ops.one_hot(codes, self.num_embeddings, dtype="float32")
        counts = ops.sum(encodings, axis=0)
        sums = ops.matmul(ops.transpose(encodings), flat) if with_sums else None
        return counts, sums


VARIANTS = {
    "ours": VectorQuantizerEMA,
    "one_hot": OneHotVQ,
    "ours_full_search": FullSearchVQ,
}


def make_step(variant, codes, x):
    """(run one step and block, memory bytes from XLA or None)."""
    layer = VARIANTS[variant](codes, D, seed=0)
    layer.build(x.shape)
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        def step(non_trainable, inputs):
            def objective(inputs):
                out, new, losses = layer.stateless_call(
                    [], non_trainable, inputs, training=True, return_losses=True
                )
                return jnp.sum(out) + sum(losses), new

            return jax.grad(objective, has_aux=True)(inputs)

        inputs = jnp.asarray(x)
        state = {"nt": [jnp.array(v.value) for v in layer.non_trainable_variables]}
        compiled = jax.jit(step, donate_argnums=0).lower(state["nt"], inputs).compile()
        analysis = compiled.memory_analysis()
        memory = None
        if analysis is not None:
            memory = {
                "temp": analysis.temp_size_in_bytes,
                "argument": analysis.argument_size_in_bytes,
                "output": analysis.output_size_in_bytes,
                "alias": analysis.alias_size_in_bytes,
            }
            memory["peak"] = (
                memory["temp"] + memory["argument"] + memory["output"] - memory["alias"]
            )

        def run():
            grad, state["nt"] = compiled(state["nt"], inputs)
            grad.block_until_ready()

        return run, memory
    if BACKEND == "tensorflow":
        import tensorflow as tf

        inputs = tf.constant(x)

        @tf.function(jit_compile=True)
        def tf_step(inputs):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                out = layer(inputs, training=True)
                total = tf.reduce_sum(out) + tf.add_n(layer.losses)
            return tape.gradient(total, inputs)

        return (lambda: tf_step(inputs).numpy()), None
    import torch

    inputs = torch.tensor(x, requires_grad=True)

    def torch_step():
        out = layer(inputs, training=True)
        total = out.sum() + sum(layer.losses)
        total.backward()
        inputs.grad = None

    return torch_step, None


def time_steps(run, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def rss_probe(variant, codes, steps=2):
    """In this (fresh) process: peak RSS increase over `steps` steps, in bytes.

    The first step compiles (TensorFlow's XLA; PyTorch is eager), and
    TensorFlow keeps the buffers of a compiled step for the next ones, so the
    increase is measured from before the first step: the compilation of this
    step is included, the one-off start of the runtime and compiler is not.
    """
    x = np.random.default_rng(0).normal(size=SHAPE).astype("float32")
    # Warm up the runtime and the compiler on 4 vectors: their one-off
    # memory (thread pools, LLVM) is then already counted in `before`.
    make_step(variant, codes, x[:1, :2, :2])[0]()
    run, _ = make_step(variant, codes, x)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _status_bytes("VmRSS")
        for _ in range(steps):
            run()
        peak = _status_bytes("VmHWM") - before
        method = "peak RSS increase, compile included (VmHWM after clear_refs)"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        for _ in range(steps):
            run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        method = "peak RSS increase, compile included (ru_maxrss)"
    return {"method": method, "peak": peak}


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def measure_rss(variant, codes):
    result = subprocess.run(
        [sys.executable, __file__, "--rss-probe", variant, str(codes)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KERAS_BACKEND": BACKEND, **MALLOC_ENV},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarize(times):
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "steps": len(times),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rss-probe", nargs=2, metavar=("VARIANT", "K"))
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results")
    )
    args = parser.parse_args()
    if args.rss_probe:
        print(json.dumps(rss_probe(args.rss_probe[0], int(args.rss_probe[1]))))
        return

    # --quick tests the harness: one codebook, whose memory probes (a fresh
    # process each on TensorFlow and PyTorch) dominate its run.
    codebooks = CODEBOOKS[:1] if args.quick else CODEBOOKS
    variants = ["ours", "one_hot"] if args.quick else list(VARIANTS)
    steps, repeats = (3, 2) if args.quick else (7, 3)  # >= 21 timed steps
    x = np.random.default_rng(0).normal(size=SHAPE).astype("float32")
    results = []
    for codes in codebooks:
        runs, memory = {}, {}
        for variant in variants:
            runs[variant], memory[variant] = make_step(variant, codes, x)
            time_steps(runs[variant], 1)  # compile
        samples = {variant: [] for variant in variants}
        for _ in range(repeats):  # interleaved
            for variant in variants:
                count = steps if variant in ("ours", "one_hot") else ABLATION_STEPS
                samples[variant] += time_steps(runs[variant], count)
        del runs
        for variant in variants:
            if memory[variant] is None:
                memory[variant] = measure_rss(variant, codes)
                memory[variant].setdefault("method", "rss")
            else:
                memory[variant]["method"] = "XLA memory_analysis"
            record = {
                "variant": variant,
                "num_embeddings": codes,
                **summarize(samples[variant]),
                "peak_memory_bytes": memory[variant]["peak"],
                "memory": memory[variant],
            }
            results.append(record)
            print(
                f"K={codes:>6}  {variant:<17} median "
                f"{1e3 * record['median_s']:8.2f} ms (min {1e3 * record['min_s']:.2f},"
                f" max {1e3 * record['max_s']:.2f})  peak "
                f"{record['peak_memory_bytes'] / 2**20:8.1f} MiB",
                flush=True,
            )

    by = {(r["variant"], r["num_embeddings"]): r for r in results}
    ratios = {
        str(codes): {
            "time_ours_over_one_hot": by["ours", codes]["median_s"]
            / by["one_hot", codes]["median_s"],
            "peak_memory_ours_over_one_hot": by["ours", codes]["peak_memory_bytes"]
            / max(by["one_hot", codes]["peak_memory_bytes"], 1),
        }
        for codes in codebooks
    }
    for codes, ratio in ratios.items():
        print(
            f"K={codes:>6}  ours / one-hot: time "
            f"{ratio['time_ours_over_one_hot']:.2f}x, peak memory "
            f"{ratio['peak_memory_ours_over_one_hot']:.2f}x"
        )
    record = {
        "benchmark": "vector_quantizer_scaling",
        "D": D,
        "N": int(np.prod(SHAPE[:-1])),
        "input_shape": list(SHAPE),
        "step": {
            "jax": "jax.jit(grad of stateless_call, training=True), state donated",
            "tensorflow": "tf.function(jit_compile=True), GradientTape",
            "torch": "eager, backward()",
        }[BACKEND],
        "memory_method": results[0]["memory"]["method"],
        "malloc_env_in_rss_probes": MALLOC_ENV if BACKEND != "jax" else None,
        "quick": args.quick,
        "backend": BACKEND,
        "versions": _versions(),
        "python": platform.python_version(),
        "cpu": _cpu(),
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "goals": {"peak_memory_ours_over_one_hot": {"max": GOAL_PEAK_MEMORY}},
        "results": results,
        "ratios": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"vector_quantizer_scaling_{BACKEND}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"written: {path}")


def _versions():
    versions = {
        "keras": keras.__version__,
        "keras_stateful": keras_stateful.__version__,
        "numpy": np.__version__,
    }
    module = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}[BACKEND]
    versions[module] = __import__(module).__version__
    return versions


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
