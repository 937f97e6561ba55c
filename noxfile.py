"""Sessions: the test matrix over the three Keras backends, lint, and the demo.

python3 -m nox -s tests      # the whole matrix (what CI runs)
python3 -m nox -s demo       # the main job, on JAX
python3 -m nox -s bench      # the benchmarks on every backend, then the report
python3 -m nox -s docs       # the documentation site, into site/
"""

from __future__ import annotations

import argparse
import os

import nox

nox.needs_version = ">=2024.4.15"
nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]

BACKENDS = ["jax", "tensorflow", "torch"]


def run_on(session: nox.Session, backend: str, *command: str) -> None:
    """Run `command` and the session's extra arguments with KERAS_BACKEND set."""
    session.run(
        *command,
        *session.posargs,
        env={"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


@nox.session
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """Run the one test suite with KERAS_BACKEND set; installs only that backend."""
    session.install("-e", f".[{backend},test,demo]")
    run_on(session, backend, "pytest")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on everything, mypy on the package."""
    session.install("-e", ".[jax,dev]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "keras_stateful")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: softmax vs softmax + CenterLoss on digits (JAX by default)."""
    session.install("-e", ".[jax,demo]")
    backend = os.environ.get("KERAS_BACKEND") or "jax"
    if backend != "jax":
        session.install("-e", f".[{backend}]")
    run_on(session, backend, "python", "examples/center_loss_digits.py")


# mkdocs-material prints a notice about MkDocs 2 on every build (its end of life
# is May 2027; Zensical, its successor, reads the same mkdocs.yml).
QUIET_MKDOCS = {"NO_MKDOCS_2_WARNING": "1"}


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (guides + API reference) into site/, warnings fatal.

    The API pages are read from the source (griffe, static): neither the package
    nor a Keras backend is installed. `-- serve` previews it instead.
    """
    pyproject = nox.project.load_toml("pyproject.toml")
    session.install(*pyproject["project"]["optional-dependencies"]["docs"])
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:], env=QUIET_MKDOCS)
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs, env=QUIET_MKDOCS)


BENCH_SCRIPTS = [
    "benchmarks/update_overhead.py",
    "benchmarks/center_loss_scaling.py",
    "benchmarks/memory_queue_scaling.py",
    "benchmarks/vector_quantizer_scaling.py",
    "benchmarks/native_comparison.py",
    "benchmarks/sync_batch_norm_overhead.py",
]


BENCH_USAGE = "bench takes --quick and --threads N"


def bench_options(posargs: list[str]) -> tuple[bool, int | None]:
    """`--quick` and `--threads N` (or `--threads=N`) from the session's arguments."""
    parser = argparse.ArgumentParser(
        prog="nox -s bench --", allow_abbrev=False, add_help=False, exit_on_error=False
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int)
    try:
        options, unknown = parser.parse_known_args(posargs)
    except argparse.ArgumentError as error:  # `--threads` without a whole number
        raise ValueError(f"{BENCH_USAGE}; received {posargs}: {error}") from None
    if unknown:
        raise ValueError(f"{BENCH_USAGE}; received {unknown}")
    return options.quick, options.threads


def bench_paths(quick: bool) -> tuple[str, str]:
    """(results folder, report): quick runs stay out of the committed results."""
    if quick:
        return ".nox/bench-quick/results", ".nox/bench-quick/REPORT.md"
    return "benchmarks/results", "benchmarks/REPORT.md"


@nox.session
@nox.parametrize("backend", BACKENDS)
def bench(session: nox.Session, backend: str) -> None:
    """Every benchmark on one backend (not in the default run), then the report.

    python3 -m nox -s bench                  # all backends -> benchmarks/REPORT.md
    python3 -m nox -s bench -- --quick       # minutes; -> .nox/bench-quick/
    python3 -m nox -s bench -- --threads 1   # one intra-op thread (a shared machine)
    """
    quick, threads = bench_options(session.posargs)
    results, _ = bench_paths(quick)
    session.install("-e", f".[{backend},bench]")
    env = {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if threads is not None:
        # Read by every script, also the ones that do not use the harness.
        env.update(
            BENCH_THREADS=str(threads),
            OMP_NUM_THREADS=str(threads),
            TF_NUM_INTRAOP_THREADS=str(threads),
            TF_NUM_INTEROP_THREADS=str(threads),
            XLA_FLAGS=f"--xla_cpu_multi_thread_eigen={str(threads > 1).lower()} "
            f"intra_op_parallelism_threads={threads}",
        )
    for script in BENCH_SCRIPTS:
        args = ["--out", results] + (["--quick"] if quick else [])
        session.run("python", script, *args, env=env)
    session.notify("bench_report")


@nox.session
def bench_report(session: nox.Session) -> None:
    """benchmarks/REPORT.md and its plots from the JSON results (`bench` runs it)."""
    quick, _ = bench_options(session.posargs)
    results, report = bench_paths(quick)
    session.install("matplotlib>=3.7")
    session.run(
        "python", "benchmarks/make_report.py", "--results", results, "--report", report
    )


if __name__ == "__main__":
    nox.main()
