"""Every `Example:` in the docstrings of keras_stateful runs, and does what it says.

Collected: the fenced ```python blocks after `Example:` in the docstring of every
public class and function (the `__all__` of keras_stateful, keras_stateful.layers
and keras_stateful.testing) and of the public methods and properties those classes
define themselves (inherited Keras docstrings are Keras's to test). Each block runs
under the current backend in a fresh namespace holding

    keras, ops (keras.ops), np (numpy), keras_stateful, and every public name of
    keras_stateful, keras_stateful.layers and keras_stateful.testing

plus, for an example that is a fragment of a user's program, the names it takes
from that program (FRAGMENT_NAMESPACES: `model`, `x_train`, `MyLayer`, ...). CHECKS
then tests what the example's comments claim. Examples are written so that a user
can paste them; a fragment gets a namespace only where making it whole would bury
its point.

No block is skipped. A block that cannot run would be listed in CANNOT_RUN with the
reason, and its test skipped with that reason; the list is empty.
"""

import inspect
import pathlib
import re
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

import keras_stateful
import keras_stateful.layers
import keras_stateful.testing
from backends_test.helpers import value_of

ROOT = pathlib.Path(__file__).resolve().parent.parent
PUBLIC_MODULES = (keras_stateful, keras_stateful.layers, keras_stateful.testing)

# Qualified name -> reason. Empty: every example runs.
CANNOT_RUN: dict[str, str] = {}


def public_api():
    """(qualified name, class or function) for every public name."""
    for module in PUBLIC_MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj


def documented_objects():
    """Public names, then the public members each class defines itself."""
    for qualname, obj in public_api():
        yield qualname, obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                member = member.fget if isinstance(member, property) else member
                if callable(member) and getattr(member, "__doc__", None):
                    yield f"{qualname}.{attr}", member


def example_blocks(docstring):
    """The ```python blocks of the docstring's `Example:` section."""
    lines = inspect.cleandoc(docstring or "").splitlines()
    if "Example:" not in [line.strip() for line in lines]:
        return []
    start = [line.strip() for line in lines].index("Example:")
    section = []
    for line in lines[start + 1 :]:
        if re.fullmatch(r"[A-Z][A-Za-z ]*:", line):  # the next section (Reference:)
            break
        section.append(line)
    blocks = re.findall(r"```python\n(.*?)```", "\n".join(section), re.S)
    return [textwrap.dedent(block) for block in blocks]


def all_examples():
    examples = {}
    for qualname, obj in documented_objects():
        for i, block in enumerate(example_blocks(obj.__doc__)):
            examples[qualname if i == 0 else f"{qualname}[{i}]"] = block
    return examples


EXAMPLES = all_examples()


def base_namespace():
    namespace = {"keras": keras, "ops": ops, "np": np, "keras_stateful": keras_stateful}
    for module in PUBLIC_MODULES:
        namespace.update({name: getattr(module, name) for name in module.__all__})
    return namespace


# --- Names that fragments take from the user's program -----------------------


@keras.saving.register_keras_serializable(package="backends_test_docstrings")
class MyLayer(keras_stateful.StatefulLayer):
    """A user's layer: a projection to `units` and the moving mean of its output."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_shape[-1], self.units),
            initializer=keras.initializers.GlorotUniform(seed=0),
        )
        self.mean = self.add_state("mean", (self.units,))

    def call(self, inputs, training=None):
        outputs = ops.matmul(inputs, self.kernel)
        batch_mean = ops.mean(ops.cast(outputs, "float32"), axis=0)
        new_mean = 0.9 * self.mean + 0.1 * batch_mean
        self.commit_state((self.mean, new_mean), training=training)
        return outputs

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def calibrate_program():
    """A trained model with moving moments, its weights after averaging, its data."""
    rng = np.random.default_rng(0)
    x_train = rng.normal(5.0, 2.0, (512, 8)).astype("float32")
    moments = keras_stateful.layers.MovingMoments()
    model = keras.Sequential([keras.Input((8,)), moments, keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    return {
        "model": model,
        "averaged_weights": model.get_weights(),
        "x_train": x_train,
        "x_test": x_train[:64],
        "y_test": np.zeros((64, 1), "float32"),
    }


def log_layer_values_program():
    """A model with a `CenterLoss` named `center_loss`, and its data."""
    features_in, labels_in = keras.Input((4,)), keras.Input((), dtype="int32")
    features = keras.layers.Dense(2)(features_in)
    features = keras_stateful.layers.CenterLoss(3, name="center_loss")(
        [features, labels_in]
    )
    model = keras.Model([features_in, labels_in], keras.layers.Dense(1)(features))
    model.compile("sgd", "mse")
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(40, 4)).astype("float32"), rng.integers(0, 3, 40)]
    return {"model": model, "x": x, "y": np.zeros((40, 1), "float32")}


FRAGMENT_NAMESPACES = {
    "keras_stateful.calibrate": calibrate_program,
    "keras_stateful.LogLayerValues": log_layer_values_program,
    "keras_stateful.testing.check_state_contract": lambda: {"MyLayer": MyLayer},
}


# --- What each example's comments claim ----------------------------------------


def check_batch_mean(ns):
    np.testing.assert_allclose(value_of(ns["layer"].mean), [0.1] * 3, rtol=1e-6)


def check_may_update(ns):
    np.testing.assert_allclose(value_of(ns["layer"].mean), [1.0] * 3, rtol=1e-6)


def check_find_stateful_layers(ns):
    found = eval("keras_stateful.find_stateful_layers(model)", ns)
    assert found == [ns["average"]]


def check_calibrate(ns):
    moments = ns["model"].layers[0]
    mean = ns["x_train"].mean(axis=0)  # two equal batches of 256: their average
    np.testing.assert_allclose(value_of(moments.moving_mean), mean, rtol=1e-5)


def check_log_layer_values(ns):
    logs = ns["history"].history
    assert len(logs["center_loss"]) == len(logs["val_center_loss"]) == 3
    assert all(np.isfinite(logs["center_loss"]))


def check_state_contract_example(ns):
    ns["test_my_layer"]()  # the example defines the test; run it


def check_center_loss(ns):
    assert tuple(ns["features"].shape) == (None, 2)


def check_fake_quant(ns):
    layer = ns["layer"]
    assert float(value_of(layer.min_val)) == -1.0
    assert float(value_of(layer.max_val)) == 2.0
    scale, zero_point = (value_of(v) for v in ns["layer"].quantization_parameters())
    np.testing.assert_allclose(scale, 3 / 255, rtol=1e-6)
    assert int(zero_point) == 85


def check_memory_queue(ns):
    logits = value_of(ns["logits"])
    assert logits.shape == (32, 65536 + 1)
    # Nothing was enqueued yet: every negative is masked.
    np.testing.assert_allclose(logits[:, 1:], -1e4 / 0.07, rtol=1e-6)


def check_memory_bank(ns):
    memory, features = value_of(ns["memory"]), value_of(ns["features"])
    assert memory.shape == (50000, 128) and value_of(ns["logits"]).shape == (8, 50000)
    moved = 0.5 * memory[100:108] + 0.5 * features
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    np.testing.assert_allclose(value_of(ns["bank"].bank)[100:108], moved, atol=1e-6)


def check_averaged_model(ns):
    teacher, kernel = ns["teacher"], ns["kernel"]
    np.testing.assert_allclose(
        value_of(teacher.averaged_variables[0]), 0.9 * kernel, rtol=1e-6
    )
    bias = value_of(teacher.averaged_variables[1])
    np.testing.assert_allclose(
        value_of(ns["outputs"]), ns["x"] @ (0.9 * kernel) + bias, rtol=1e-5, atol=1e-6
    )


def check_moving_average(ns):
    np.testing.assert_allclose(value_of(ns["layer"].average), [1.0] * 3, rtol=1e-6)


def check_moving_moments(ns):
    moments = ns["moments"]
    np.testing.assert_allclose(value_of(moments.moving_mean), [0.3] * 4, atol=0.05)
    np.testing.assert_allclose(value_of(moments.moving_variance), [1.3] * 4, atol=0.1)


def check_percentile_normalization(ns):
    norm = ns["norm"]
    assert (float(value_of(norm.lo)), float(value_of(norm.hi))) == (2.5, 47.5)
    expected = (ns["returns"] - 2.5) / 45
    np.testing.assert_allclose(value_of(ns["scaled"]), expected, rtol=1e-6)


def check_running_standardization(ns):
    assert tuple(ns["outputs"].shape) == (None, 1)


def check_spectral_normalization(ns):
    np.testing.assert_allclose(value_of(ns["y"]), [[8 / np.sqrt(48)] * 3], rtol=1e-5)
    np.testing.assert_allclose(value_of(ns["layer"].sigma()), np.sqrt(48), rtol=1e-5)
    np.testing.assert_array_equal(value_of(ns["dense"].kernel), np.full((4, 3), 2.0))


def check_sync_batch_normalization(ns):
    y = value_of(ns["y"])
    np.testing.assert_allclose(y.mean(0), [0.0] * 4, atol=1e-5)
    np.testing.assert_allclose(y.var(0), [1.0] * 4, atol=1e-3)
    np.testing.assert_allclose(value_of(ns["bn"].moving_mean), [0.3] * 4, atol=0.1)


def check_vector_quantizer(ns):
    logs = ns["history"].history
    for key in ("loss", "vq_perplexity", "vq_usage", "vq_commitment_loss"):
        assert np.isfinite(logs[key]).all(), key
    assert int(value_of(ns["vq"].counter)) == 2  # 64 samples, batches of 32


def check_residual_vector_quantizer(ns):
    history = ns["history"].history
    for i in range(4):
        for key in ("perplexity", "usage", "commitment_loss"):
            assert np.isfinite(history[f"rvq_{i}_{key}"][0])
    assert [stage.name for stage in ns["rvq"].quantizers] == [
        "rvq_0",
        "rvq_1",
        "rvq_2",
        "rvq_3",
    ]


def check_logged_center_loss(ns):
    # Four samples at distance 1/2 * |(1, 1) - 0|^2 = 1 from zero centers.
    layer = ns.get("layer")
    values = (
        layer.logged_values()
        if layer
        else eval("keras_stateful.read_logged_values(model)", ns)
    )
    assert values == {"center_loss": 1.0}


def check_state_snapshot(ns):
    np.testing.assert_allclose(
        eval("state_snapshot(layer)", ns)["average"], [0.1] * 3, rtol=1e-5
    )


def check_variables_snapshot(ns):
    assert ns["before"] and ns["before"].keys() == ns["after"].keys()


CHECKS = {
    "keras_stateful.layers.AveragedModel": check_averaged_model,
    "keras_stateful.evaluation_logging": check_logged_center_loss,
    "keras_stateful.read_logged_values": check_logged_center_loss,
    "keras_stateful.testing.state_snapshot": check_state_snapshot,
    "keras_stateful.testing.variables_snapshot": check_variables_snapshot,
    "keras_stateful.StatefulLayer": check_batch_mean,
    "keras_stateful.StatefulLayer.may_update": check_may_update,
    "keras_stateful.find_stateful_layers": check_find_stateful_layers,
    "keras_stateful.calibrate": check_calibrate,
    "keras_stateful.LogLayerValues": check_log_layer_values,
    "keras_stateful.testing.check_state_contract": check_state_contract_example,
    "keras_stateful.layers.CenterLoss": check_center_loss,
    "keras_stateful.layers.FakeQuant": check_fake_quant,
    "keras_stateful.layers.MemoryBank": check_memory_bank,
    "keras_stateful.layers.MemoryQueue": check_memory_queue,
    "keras_stateful.layers.MovingAverage": check_moving_average,
    "keras_stateful.layers.MovingMoments": check_moving_moments,
    "keras_stateful.layers.PercentileNormalization": check_percentile_normalization,
    "keras_stateful.layers.ResidualVectorQuantizer": check_residual_vector_quantizer,
    "keras_stateful.layers.RunningStandardization": check_running_standardization,
    "keras_stateful.layers.SpectralNormalization": check_spectral_normalization,
    "keras_stateful.layers.SyncBatchNormalization": check_sync_batch_normalization,
    "keras_stateful.layers.VectorQuantizerEMA": check_vector_quantizer,
}


@pytest.mark.parametrize("qualname", sorted(EXAMPLES))
def test_docstring_example_runs_and_does_what_it_says(qualname):
    if qualname in CANNOT_RUN:
        pytest.skip(CANNOT_RUN[qualname])
    namespace = base_namespace()
    namespace.update(FRAGMENT_NAMESPACES.get(qualname, dict)())
    exec(compile(EXAMPLES[qualname], f"<{qualname} example>", "exec"), namespace)
    if qualname in CHECKS:
        CHECKS[qualname](namespace)


def test_every_public_class_and_function_has_an_example():
    missing = [name for name, obj in public_api() if not example_blocks(obj.__doc__)]
    assert not missing, f"no ```python block after `Example:` in: {missing}"


def test_fixtures_and_checks_name_existing_examples():
    stale = (set(FRAGMENT_NAMESPACES) | set(CHECKS) | set(CANNOT_RUN)) - set(EXAMPLES)
    assert not stale, f"entries for examples that no docstring has: {stale}"


def test_every_public_name_has_an_api_page():
    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").rglob("*.md"))
    missing = [
        name for name, _ in public_api() if not re.search(rf"^::: {name}$", pages, re.M)
    ]
    assert not missing, (
        f"no API page for {missing}; add e.g. docs/api/layers/NewLayer.md holding "
        "`::: keras_stateful.layers.NewLayer`"
    )
