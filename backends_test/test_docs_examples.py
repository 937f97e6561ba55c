"""The README's example and the demo script run, and do what they say."""

import os
import pathlib
import re
import runpy
import subprocess
import sys

import keras
import numpy as np

import keras_stateful
from backends_test.helpers import BACKEND, value_of

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_example_updates_in_fit_only():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model = namespace["model"]
    layer = model.layers[0]
    x = np.random.default_rng(0).normal(loc=2.0, size=(32, 4)).astype("float32")
    model.predict(x, verbose=0)
    assert not value_of(layer.mean).any()
    model.fit(x, np.zeros((32, 1)), batch_size=32, verbose=0)
    np.testing.assert_allclose(value_of(layer.mean), 0.1 * x.mean(0), rtol=1e-5)
    assert isinstance(model, keras.Model)


def test_demo_script_runs(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "center_loss_digits.py"),
            "--epochs=2",
            f"--out={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "KERAS_BACKEND": BACKEND,
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), os.environ.get("PYTHONPATH", "")]
            ),
        },
        timeout=300,
        check=True,
    )
    assert f"backend: {BACKEND}" in result.stdout
    assert "softmax + CenterLoss" in result.stdout
    assert (tmp_path / "center_loss_digits.png").stat().st_size > 10_000


def test_migration_guide_ports_run_and_update_in_training_only():
    guide = (ROOT / "docs" / "migrating-from-add_update.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    plain_port, stateful_port = blocks[2], blocks[3]
    features = np.random.default_rng(0).normal(size=(6, 2)).astype("float32")
    one_hot = np.eye(10, dtype="float32")[[0, 0, 1, 2, 2, 2]]
    for code in (plain_port, stateful_port):
        namespace = {"keras": keras, "ops": keras.ops}
        namespace["keras_stateful"] = __import__("keras_stateful")
        exec(compile(code, "migrating-from-add_update.md", "exec"), namespace)
        layer = namespace["CenterLossLayer"](alpha=0.5)
        layer([features, one_hot])
        before = value_of(layer.centers)
        layer([features, one_hot], training=False)
        assert np.array_equal(value_of(layer.centers), before)
        layer([features, one_hot], training=True)
        delta = one_hot.T @ (one_hot @ before - features)
        delta /= one_hot.sum(0)[:, None] + 1
        np.testing.assert_allclose(
            value_of(layer.centers), before - 0.5 * delta, rtol=1e-5, atol=1e-6
        )


def test_running_statistics_guide_runs():
    guide = (ROOT / "docs" / "running-statistics.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    namespace = {}
    exec(compile(blocks[0], "running-statistics.md", "exec"), namespace)
    stats = namespace["stats"]
    assert state_counter(stats) == 8  # 256 samples, batch size 32
    exec(compile(blocks[1], "running-statistics.md", "exec"), namespace)
    x_train = np.random.default_rng(0).normal(5.0, 2.0, (64, 8)).astype("float32")
    namespace.update(averaged_weights=namespace["model"].get_weights(), x_train=x_train)
    exec(compile(blocks[2], "running-statistics.md", "exec"), namespace)
    standard = namespace["model"].layers[0]
    np.testing.assert_allclose(value_of(standard.mean), x_train.mean(0), rtol=1e-5)


def state_counter(layer):
    return int(value_of(layer.counter))


def test_accumulation_drift_script_shows_what_the_guide_says():
    namespace = runpy.run_path(str(ROOT / "examples" / "accumulation_drift.py"))
    drifts = namespace["main"]()
    every, accumulated = drifts.values()
    assert every > 1.0  # the guide's first row: 3.10
    assert accumulated < 1e-6  # its second row


def test_accumulation_guide_layer_updates_once_per_window():
    guide = (ROOT / "docs" / "gradient-accumulation.md").read_text()
    code = re.findall(r"```python\n(.*?)```", guide, re.S)[1]
    namespace = {"keras": keras, "ops": keras.ops, "keras_stateful": keras_stateful}
    exec(compile(code, "gradient-accumulation.md", "exec"), namespace)
    layer = namespace["BatchMean"](accumulation_steps=2)
    x = np.arange(12, dtype="float32").reshape(4, 3)
    layer(x[:2], training=True)
    assert not value_of(layer.mean).any()
    layer(x[2:], training=True)
    np.testing.assert_allclose(value_of(layer.mean), 0.1 * x.mean(0), rtol=1e-6)
