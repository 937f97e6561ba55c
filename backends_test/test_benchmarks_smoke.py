"""Smoke test of benchmarks/: every script runs with `--quick` on this backend.

Each script runs in this process (its command line, through `runpy`) into a
temporary folder, never benchmarks/results/; the test checks that it wrote
valid JSON with the expected keys, and that make_report turns the results
into a REPORT.md with all six sections and PNG plots. No timing is
asserted: the figures of a quick run mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import runpy
import sys
import time

import keras
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
BACKEND = keras.backend.backend()
PNG = b"\x89PNG\r\n\x1a\n"

# benchmark -> (keys of a result row, keys of the record besides the common ones)
EXPECTED = {
    "update_overhead": ({"model", "layer", "variant"}, {"ratios"}),
    "center_loss_scaling": ({"variant", "num_classes"}, {"summary", "D", "B"}),
    "center_loss_batch_sweep": (
        {"variant", "batch", "num_classes"},
        {"summary", "increments", "D", "K_goal"},
    ),
    "memory_queue_scaling": ({"variant", "size"}, {"summary", "D", "B"}),
    "vector_quantizer_scaling": (
        {"variant", "num_embeddings", "peak_memory_bytes"},
        {"ratios", "D", "N"},
    ),
    "native_comparison": ({"part", "variant"}, {"ratios"}),
    "averaged_model": ({"variant"}, {"ratios", "memory", "widths"}),
    "sync_batch_norm_overhead": ({"model", "variant"}, {"ratios", "sync_over_keras"}),
}
# "goals": every script writes its goals there ({} for none); the report reads them.
COMMON = {"benchmark", "backend", "quick", "versions", "cpu", "cores", "date", "goals"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Runs a script once per test module: `run(name)` -> (JSON path, seconds)."""
    out = tmp_path_factory.mktemp("bench")
    done: dict[str, tuple[pathlib.Path, float]] = {}

    def run(name: str) -> tuple[pathlib.Path, float]:
        if name not in done:
            start = time.perf_counter()
            _run_script(f"{name}.py", "--quick", "--out", str(out))
            done[name] = (out / f"{name}_{BACKEND}.json", time.perf_counter() - start)
        return done[name]

    run.out = out
    return run


def _run_script(script: str, *argv: str) -> None:
    path = BENCHMARKS / script
    saved_argv, saved_path = sys.argv, list(sys.path)
    saved_pythonpath = os.environ.get("PYTHONPATH")
    sys.argv = [str(path), *argv]
    sys.path.insert(0, str(BENCHMARKS))  # as `python benchmarks/<script>` has it
    # Subprocesses a script starts (the memory probes) import keras_stateful
    # from this checkout too, installed or not.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(BENCHMARKS.parent), saved_pythonpath) if p
    )
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        if saved_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_pythonpath
        keras.utils.clear_session()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_quick_benchmark_writes_valid_json(quick_run, name):
    path, seconds = quick_run(name)
    print(f"{name} --quick on {BACKEND}: {seconds:.1f} s")
    record = json.loads(path.read_text())
    row_keys, record_keys = EXPECTED[name]
    assert COMMON | record_keys <= set(record), set(record)
    assert record["benchmark"] == name
    assert record["backend"] == BACKEND
    assert record["quick"] is True
    assert record["cores"] >= 1
    assert record["results"]
    for row in record["results"]:
        assert row_keys <= set(row), row
        assert row["steps"] >= 1
        values = (row["min_s"], row["median_s"], row["max_s"])
        assert all(math.isfinite(v) and v > 0 for v in values), row
        assert row["min_s"] <= row["median_s"] <= row["max_s"], row


def test_report_from_quick_results(quick_run):
    for name in EXPECTED:
        quick_run(name)
    report = quick_run.out / "report" / "REPORT.md"
    _run_script(
        "make_report.py", "--results", str(quick_run.out), "--report", str(report)
    )
    text = report.read_text()
    for title in (
        "## 1. Overhead of the update",
        "## 2. CenterLoss scaling",
        "## 2b. CenterLoss batch sweep",
        "## 3. MemoryQueue scaling",
        "## 4. VectorQuantizerEMA",
        "## 5. Against",
        "## 6. AveragedModel",
        "## 7. SyncBatchNormalization",
    ):
        assert title in text
    assert "quick run" in text
    images = [line for line in text.splitlines() if line.startswith("![")]
    assert len(images) == len(EXPECTED)
    for line in images:
        png = report.parent / line.split("(", 1)[1].rstrip(")")
        assert png.read_bytes()[:8] == PNG, png
