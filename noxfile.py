"""Sessions: the test matrix over the three Keras backends, lint, and the demo.

python3 -m nox -s tests      # the whole matrix (what CI runs)
python3 -m nox -s demo       # the main job, on JAX
"""

from __future__ import annotations

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


@nox.session
@nox.parametrize("backend", BACKENDS)
def bench(session: nox.Session, backend: str) -> None:
    """Benchmarks (not part of the default run); `-- --quick` for a short run."""
    session.install("-e", f".[{backend},bench]")
    run_on(session, backend, "python", "benchmarks/center_loss_scaling.py")


if __name__ == "__main__":
    nox.main()
