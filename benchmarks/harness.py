"""The benchmarks' shared harness: machine metadata, interleaved timing, JSON.

Every benchmark script imports it (`import harness`, from the scripts' own
folder) and follows the same discipline:

- each variant is a callable that runs one step; `block` waits for its result
  (`jax.block_until_ready` on JAX, which dispatches asynchronously; the
  train-step helpers below also wait for the model's variables);
- `time_interleaved` runs `warmup` untimed steps per variant (the first step
  compiles), then `rounds` rounds in which every variant runs `steps` timed
  steps (more for a fast variant, up to `min_round_s` seconds), the variants
  taking turns (in alternating order), so that a slow spell of the machine
  hits all of them;
- `summarize` reports the median and the min-max of the per-step times, and
  the medians per round; `ratio` compares two variants round by round (the
  median of the per-round ratios), which cancels slow drifts of the load;
- `metadata` records the backend, the library versions, the CPU, the core
  count and the date with every result; `write_json` writes
  `<out>/<benchmark>_<backend>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras

BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":  # one tf.function per model: retracing warnings
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# Distributions whose versions are recorded when installed (never imported here).
_DISTRIBUTIONS = (
    "keras",
    "numpy",
    "jax",
    "jaxlib",
    "tensorflow",
    "tensorflow-cpu",
    "torch",
    "matplotlib",
)


def parser(description: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes: `--quick`, `--threads`, `--out`."""
    parse = argparse.ArgumentParser(description=description)
    parse.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and few steps: checks that the script runs (seconds)",
    )
    parse.add_argument(
        "--threads",
        type=int,
        default=int(os.environ["BENCH_THREADS"])
        if os.environ.get("BENCH_THREADS")
        else None,
        help="intra-op threads of the backend (default: the backend's own, all "
        "cores); 1 gives steadier figures on a machine shared with other jobs",
    )
    parse.add_argument(
        "--out",
        type=pathlib.Path,
        default=RESULTS,
        help=f"folder for the JSON results (default: {RESULTS})",
    )
    return parse


_START: dict[str, Any] = {}


def parse_args(
    doc: str | None, argv: Sequence[str] | None = None, **extra: Any
) -> argparse.Namespace:
    """Parse the common options (`parser`) and apply `--threads`."""
    parse = parser((doc or "").splitlines()[0] if doc else None)
    for flag, options in extra.items():
        parse.add_argument(flag, **options)
    args = parse.parse_args(argv)
    set_threads(args.threads)
    _START.update(time=time.perf_counter(), load=_load())
    return args


def _load() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def set_threads(threads: int | None) -> None:
    """Limit the backend's intra-op threads; call before the first computation.

    On JAX it sets `XLA_FLAGS`, which only takes effect if the CPU backend has
    not started yet (`metadata` records what is in force).
    """
    if threads is None:
        return
    if BACKEND == "torch":
        import torch

        torch.set_num_threads(threads)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    elif BACKEND == "jax" and "intra_op_parallelism" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_cpu_multi_thread_eigen={str(threads > 1).lower()} "
            f"intra_op_parallelism_threads={threads}"
        ).strip()
    os.environ["BENCH_THREADS"] = str(threads)


def threads_in_force() -> dict[str, Any]:
    found: dict[str, Any] = {"requested": os.environ.get("BENCH_THREADS")}
    if BACKEND == "torch":
        import torch

        found["torch.get_num_threads"] = torch.get_num_threads()
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        found["intra_op"] = tf.config.threading.get_intra_op_parallelism_threads()
    elif BACKEND == "jax":
        found["XLA_FLAGS"] = os.environ.get("XLA_FLAGS")
    return found


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    found = {}
    for name in _DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    import keras_stateful

    found["keras_stateful"] = keras_stateful.__version__
    return found


def git_commit() -> str | None:
    """The short commit of this checkout, `+changes` if tracked files differ."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            cwd=pathlib.Path(__file__).parent,
            timeout=10,
        )

    try:
        result = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def source_digest() -> str | None:
    """A short SHA-256 of keras_stateful's source files, as imported.

    Ties a result to the exact library code even when the working tree has
    uncommitted changes (`commit` then ends in `+changes`).
    """
    import hashlib

    import keras_stateful

    root = pathlib.Path(keras_stateful.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def metadata(*, quick: bool) -> dict[str, Any]:
    """What every result records: backend, versions, machine, date."""
    return {
        "backend": BACKEND,
        "quick": quick,
        "versions": versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads_in_force(),
        # The 1/5/15-minute load averages at the start and the end of the run:
        # above the core count, other jobs competed for the CPU.
        "load_average_start": _START.get("load"),
        "load_average_end": _load(),
        "wall_s": time.perf_counter() - _START["time"] if _START else None,
        "commit": git_commit(),
        "keras_stateful_source_sha256": source_digest(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
    }


def block(value: Any) -> Any:
    """Wait until `value` (any nest of arrays) is computed; returns it."""
    if BACKEND == "jax":
        import jax

        return jax.block_until_ready(value)
    if BACKEND == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return value


def train_step(model: keras.Model, x: Any, y: Any) -> Callable[[], Any]:
    """One `model.train_on_batch(x, y)` (the user's step), waited for in full.

    `train_on_batch` returns the loss as NumPy (so the step has run); on JAX
    the new variable values are also waited for, as the next step needs them.
    """
    variables = model.variables

    def run() -> Any:
        loss = model.train_on_batch(x, y)
        if BACKEND == "jax":
            block([v.value for v in variables])
        return loss

    return run


def time_interleaved(
    variants: dict[Any, Callable[[], Any]],
    *,
    steps: int,
    rounds: int,
    warmup: int = 2,
    min_round_s: float = 0.0,
    max_steps: int = 100,
) -> dict[Any, dict[str, Any]]:
    """Time at least `steps * rounds` steps per variant, interleaved by round.

    In each round every variant runs `steps` steps, and then more (up to
    `max_steps`) until it has spent `min_round_s` seconds: a fast variant
    then gets enough steps for a steady round median beside a slow one.
    Returns, per variant, `summarize` of its step times.
    """
    for run in variants.values():
        for _ in range(warmup):  # compile, allocate: not timed
            block(run())
    times: dict[Any, list[float]] = {name: [] for name in variants}
    per_round: dict[Any, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            run = variants[name]
            this_round: list[float] = []
            while len(this_round) < steps or (
                sum(this_round) < min_round_s and len(this_round) < max_steps
            ):
                start = time.perf_counter()
                block(run())
                this_round.append(time.perf_counter() - start)
            times[name] += this_round
            per_round[name].append(statistics.median(this_round))
    return {name: summarize(times[name], per_round[name]) for name in names}


def summarize(times: Sequence[float], round_medians: Sequence[float] = ()) -> dict:
    """Median, min and max of per-step times in seconds (and per-round medians)."""
    summary = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "steps": len(times),
    }
    if round_medians:
        summary["round_medians_s"] = list(round_medians)
    return summary


def ratio(a: dict, b: dict) -> dict[str, float]:
    """`a / b` of two `time_interleaved` results.

    - `median`: the median over rounds of (a's round median / b's round
      median). The two ran back to back in each round, so a change of the
      machine's load between rounds cancels: this is the figure reported.
    - `round_min`, `round_max`: the range of those per-round ratios, and
      `round_q25`, `round_q75` their quartiles (from 4 rounds on).
    - `of_medians`: a's median step time / b's median step time.
    """
    result = {"of_medians": a["median_s"] / b["median_s"]}
    rounds_a, rounds_b = a.get("round_medians_s"), b.get("round_medians_s")
    if rounds_a and rounds_b:
        per_round = [x / y for x, y in zip(rounds_a, rounds_b, strict=True)]
        result["median"] = statistics.median(per_round)
        result["round_min"], result["round_max"] = min(per_round), max(per_round)
        if len(per_round) >= 4:
            quartiles = statistics.quantiles(per_round, n=4)
            result["round_q25"], result["round_q75"] = quartiles[0], quartiles[2]
    else:
        result["median"] = result["of_medians"]
    return result


def write_json(
    out: pathlib.Path, benchmark: str, record: dict[str, Any]
) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{benchmark}_{BACKEND}.json"
    record = _rounded({"benchmark": benchmark, **record})
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {path}", flush=True)
    return path


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits (timings are not more precise)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3f} ms" if seconds < 0.01 else f"{1e3 * seconds:.2f} ms"


def log(*parts: Any) -> None:
    print(*parts, flush=True, file=sys.stdout)
