"""The README's example and the demo script run, and do what they say."""

import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np

from backends_test.conftest import BACKEND, value_of

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


def test_demo_script_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_tiny.py")],
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
    assert "unchanged by predict():        True" in result.stdout
