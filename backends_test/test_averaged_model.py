"""AveragedModel against a NumPy replay of the student and torch's AveragedModel."""

import importlib.util
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest
from keras import ops

from backends_test.helpers import value_of
from keras_stateful.layers import AveragedModel
from keras_stateful.testing import check_state_contract, state_snapshot

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 9

# name: (AveragedModel keyword arguments, NumPy replay keyword arguments)
SCHEDULES = {
    "constant": {"decay": 0.8},
    "constant_every_3": {"decay": 0.7, "update_every": 3},
    "warmup": {
        "decay": 0.9, "warmup": True, "warmup_gamma": 2.0, "warmup_power": 0.75,
        "min_decay": 0.1, "update_after_step": 2,
    },
    "warmup_timm_defaults": {"decay": 0.99, "warmup": True},
    "cosine": {"decay": 0.6, "schedule": "cosine", "total_steps": 5},
    "swa": {"mode": "swa", "swa_start": 2},
    "swa_every_2": {"mode": "swa", "swa_start": 1, "update_every": 2},
}  # fmt: skip


def numpy_decay(t, n, options):
    """The issue's rules: (due, decay_t) at training step t with n updates made."""
    every = options.get("update_every", 1)
    if options.get("mode") == "swa":
        s = t - options.get("swa_start", 0) - 1
        decay = n / (n + 1)
    else:
        s = t - options.get("update_after_step", 0) - 1
        base = options["decay"]
        if options.get("warmup"):
            gamma = options.get("warmup_gamma", 1.0)
            power = options.get("warmup_power", 2 / 3)
            decay = 1 - (1 + max(s, 0) / gamma) ** -power
            decay = min(max(decay, options.get("min_decay", 0.0)), base)
        elif options.get("schedule") == "cosine":
            total = options["total_steps"]
            k = min(n, total)
            decay = 1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2
        else:
            decay = base
    due = s >= 0 and s % every == 0
    return due, (0.0 if n == 0 else decay)


def numpy_replay(initial, recorded, options, averaged_mask):
    """Average the student's recorded values (one list per step) in float64."""
    average = [np.asarray(v, "float64") for v in initial]
    n = 0
    for t, values in enumerate(recorded, start=1):
        due, decay = numpy_decay(t, n, options)
        if not due:
            continue
        average = [
            decay * a + (1 - decay) * w if averaged else np.asarray(w, "float64")
            for a, w, averaged in zip(average, values, averaged_mask, strict=True)
        ]
        n += 1
    return average, n


def make_student(seed=0, batch_norm=True, dtype=None):
    layers = [
        keras.Input((4,)),
        keras.layers.Dense(
            5, kernel_initializer=keras.initializers.GlorotUniform(seed), dtype=dtype
        ),
    ]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(momentum=0.5, dtype=dtype))
    layers.append(
        keras.layers.Dense(
            3,
            kernel_initializer=keras.initializers.GlorotUniform(seed + 1),
            dtype=dtype,
        )
    )
    return keras.Sequential(layers)


def student_with_teacher(averaged, student):
    """x -> student(x) trained on MSE; averaged(x) as a second, loss-free output."""
    inputs = keras.Input((4,))
    model = keras.Model(inputs, [student(inputs), averaged(inputs)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=["mse", None])
    return model


def numbers(variables):
    return [value_of(v) for v in variables]


def train_and_record(options, rng, steps=STEPS, batch_norm=True, **kwargs):
    student = make_student(batch_norm=batch_norm)
    averaged = AveragedModel(student, **options, **kwargs)
    model = student_with_teacher(averaged, student)
    initial = numbers(student.variables)
    recorded = []
    for _ in range(steps):
        x = rng.normal(size=(8, 4)).astype("float32")
        y = rng.normal(size=(8, 3)).astype("float32")
        recorded.append(numbers(student.variables))
        model.train_on_batch(x, y)
    return student, averaged, initial, recorded


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_matches_numpy_replay_of_the_students_weights(name, rng):
    options = SCHEDULES[name]
    student, averaged, initial, recorded = train_and_record(options, rng)
    expected, updates = numpy_replay(
        initial, recorded, options, [True] * len(student.variables)
    )
    assert not np.allclose(recorded[-1][0], recorded[0][0])  # the student learned
    for variable, average, reference in zip(
        student.variables, averaged.averaged_variables, expected, strict=True
    ):
        np.testing.assert_allclose(
            value_of(average), reference, rtol=1e-6, atol=1e-6, err_msg=variable.path
        )
    assert state_snapshot(averaged)["step"] == STEPS
    assert state_snapshot(averaged)["num_updates"] == updates


def test_copies_non_trainable_when_asked(rng):
    options = {"decay": 0.8}
    student, averaged, initial, recorded = train_and_record(
        options, rng, average_non_trainable=False
    )
    mask = [v.trainable for v in student.variables]
    assert not all(mask)  # BatchNormalization's moving statistics
    expected, _ = numpy_replay(initial, recorded, options, mask)
    for average, reference in zip(averaged.averaged_variables, expected, strict=True):
        np.testing.assert_allclose(value_of(average), reference, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(
    keras.backend.backend() != "torch" or importlib.util.find_spec("torch") is None,
    reason="PyTorch's AveragedModel is the reference only in the torch session",
)
@pytest.mark.parametrize("name", ["constant", "warmup", "cosine", "swa"])
def test_matches_torch_averaged_model(name, rng):
    import torch
    from torch.optim.swa_utils import AveragedModel as TorchAveragedModel
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    options = SCHEDULES[name]
    _, averaged, _, recorded = train_and_record(options, rng, batch_norm=False)
    module = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.tensor(w)) for w in recorded[0]]
    )
    reference = TorchAveragedModel(module)
    n = 0
    for t, values in enumerate(recorded, start=1):
        due, decay = numpy_decay(t, n, options)
        if not due:
            continue
        with torch.no_grad():
            for parameter, value in zip(module, values, strict=True):
                parameter.copy_(torch.tensor(value))
        if options.get("mode") != "swa":
            reference.multi_avg_fn = get_ema_multi_avg_fn(decay)
        reference.update_parameters(module)
        n += 1
    for average, expected in zip(
        averaged.averaged_variables, reference.module, strict=True
    ):
        np.testing.assert_allclose(
            value_of(average), expected.detach().numpy(), rtol=1e-6, atol=1e-6
        )


def test_first_update_copies_and_output_uses_the_average(rng):
    student = make_student()
    averaged = AveragedModel(student, decay=0.9)
    x = rng.normal(size=(6, 4)).astype("float32")
    for variable in student.trainable_variables:
        variable.assign(variable * 2.0)
    averaged(x, training=True)
    for variable, average in zip(
        student.variables, averaged.averaged_variables, strict=True
    ):
        np.testing.assert_array_equal(value_of(average), value_of(variable))
    twin = make_student(seed=1)
    twin.set_weights(student.get_weights())
    np.testing.assert_allclose(
        value_of(averaged(x)), value_of(twin(x, training=False)), rtol=1e-6, atol=1e-6
    )


def test_output_is_the_student_with_averaged_weights(rng):
    student, averaged, _, _ = train_and_record({"decay": 0.5}, rng, steps=3)
    x = rng.normal(size=(5, 4)).astype("float32")
    twin = make_student(seed=1)
    for variable, average in zip(
        twin.variables, averaged.averaged_variables, strict=True
    ):
        variable.assign(ops.cast(average, variable.dtype))
    np.testing.assert_allclose(
        value_of(averaged(x)), value_of(twin(x, training=False)), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(value_of(averaged(x)), value_of(student(x)))


def test_the_students_variables_are_never_written(rng):
    student = make_student()
    averaged = AveragedModel(student, decay=0.5, training_mode=True)
    x = rng.normal(loc=3.0, size=(6, 4)).astype("float32")
    before = numbers(student.variables)
    for training in (True, True, False, None):
        averaged(x, training=training)
    for value, after in zip(before, numbers(student.variables), strict=True):
        np.testing.assert_array_equal(value, after)


def test_training_mode_uses_batch_statistics_in_training_calls(rng):
    x = rng.normal(loc=3.0, size=(6, 4)).astype("float32")
    plain = AveragedModel(make_student(), decay=0.5)
    batch_mode = AveragedModel(make_student(), decay=0.5, training_mode=True)
    plain_out = value_of(plain(x, training=True))
    batch_out = value_of(batch_mode(x, training=True))
    assert not np.allclose(plain_out, batch_out)
    np.testing.assert_allclose(value_of(batch_mode(x)), value_of(plain(x)), rtol=1e-6)


def test_no_gradient_reaches_the_student_through_the_average(rng):
    student = make_student(batch_norm=False)
    averaged = AveragedModel(student, decay=0.5)
    inputs = keras.Input((4,))
    other = keras.layers.Dense(3)  # something to train beside the average
    model = keras.Model(inputs, [averaged(inputs), other(inputs)])
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=["mse", "mse"])
    before = numbers(student.trainable_variables)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = np.ones((8, 3), "float32")
    model.fit(x, [y, y], batch_size=4, verbose=0)
    for value, after in zip(before, numbers(student.trainable_variables), strict=True):
        np.testing.assert_array_equal(value, after)
    assert state_snapshot(averaged)["num_updates"] == 2


@pytest.mark.parametrize("jit_compile", ["auto", False])
def test_fit_updates_once_per_step(jit_compile, rng):
    student = make_student()
    averaged = AveragedModel(student, decay=0.5)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, [student(inputs), averaged(inputs)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=["mse", None], jit_compile=jit_compile
    )
    x = rng.normal(size=(12, 4)).astype("float32")
    model.fit(x, np.ones((12, 3), "float32"), batch_size=4, epochs=2, verbose=0)
    assert (
        state_snapshot(averaged)["step"] == 6
        and state_snapshot(averaged)["num_updates"] == 6
    )
    model.predict(x, verbose=0)
    model.evaluate(x, np.ones((12, 3), "float32"), verbose=0)
    assert state_snapshot(averaged)["step"] == 6


def test_student_shared_by_two_branches(rng):
    """One update per step per training call of the wrapper, not per student call."""
    student = make_student()
    averaged = AveragedModel(student, decay=0.5)
    first, second = keras.Input((4,)), keras.Input((4,))
    once = keras.Model(
        [first, second], [student(first), student(second), averaged(first)]
    )
    once.compile(optimizer="sgd", loss=["mse", "mse", None])
    x = rng.normal(size=(8, 4)).astype("float32")
    y = np.ones((8, 3), "float32")
    once.fit([x, x], [y, y], batch_size=4, verbose=0)  # 2 steps
    assert state_snapshot(averaged)["num_updates"] == 2
    twice = keras.Model(
        [first, second], [student(first), averaged(first), averaged(second)]
    )
    twice.compile(optimizer="sgd", loss=["mse", None, None])
    twice.fit([x, x], [y, y, y], batch_size=4, verbose=0)  # 2 steps, 2 calls each
    assert state_snapshot(averaged)["num_updates"] == 2 + 4


def test_save_and_load_keeps_the_average_and_the_shared_student(rng):
    options = {"decay": 0.7, "warmup": True}
    student, averaged, _, _ = train_and_record(options, rng, steps=3)
    model = averaged_model_of(student, averaged)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 3)).astype("float32")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    loaded_averaged = loaded.get_layer(averaged.name)
    assert loaded_averaged.layer is loaded.get_layer(student.name)
    config, loaded_config = averaged.get_config(), loaded_averaged.get_config()
    assert {**loaded_config, "layer": None} == {**config, "layer": None}
    for a, b in zip(
        averaged.state_variables, loaded_averaged.state_variables, strict=True
    ):
        np.testing.assert_array_equal(value_of(a), value_of(b))
    for m in (model, loaded):
        m.train_on_batch(x, y)
    for a, b in zip(
        averaged.state_variables, loaded_averaged.state_variables, strict=True
    ):
        np.testing.assert_allclose(value_of(a), value_of(b), rtol=1e-6, atol=1e-7)


def averaged_model_of(student, averaged):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, [student(inputs), averaged(inputs)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=["mse", None])
    return model


def test_custom_training_loop_with_stateless_call(rng):
    """A JAX-style loop: the model's stateless_call returns the new average."""
    student = make_student(batch_norm=False)
    averaged = AveragedModel(student, decay=0.6)
    model = averaged_model_of(student, averaged)
    trainable = [ops.convert_to_tensor(value_of(v)) for v in model.trainable_variables]
    non_trainable = [
        ops.convert_to_tensor(value_of(v)) for v in model.non_trainable_variables
    ]
    recorded = []
    x = rng.normal(size=(4, 4)).astype("float32")
    for _ in range(4):
        recorded.append([value_of(v) for v in trainable])
        _, non_trainable = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        trainable = [v * 0.9 + 0.05 for v in trainable]  # a made-up optimizer step
    expected, _ = numpy_replay(
        recorded[0], recorded, {"decay": 0.6}, [True] * len(recorded[0])
    )
    by_id = dict(
        zip(map(id, model.non_trainable_variables), non_trainable, strict=True)
    )
    for average, reference in zip(averaged.averaged_variables, expected, strict=True):
        np.testing.assert_allclose(
            ops.convert_to_numpy(by_id[id(average)]), reference, rtol=1e-6, atol=1e-6
        )
    assert state_snapshot(averaged)["step"] == 0  # stateless: the variables stay


def test_float16_student_float32_average(rng):
    student = make_student(batch_norm=False, dtype="float16")
    averaged = AveragedModel(student, decay=0.5)
    model = averaged_model_of(student, averaged)
    initial = numbers(student.variables)
    recorded = []
    for _ in range(4):
        recorded.append(numbers(student.variables))
        x = rng.normal(size=(8, 4)).astype("float32")
        model.train_on_batch(x, rng.normal(size=(8, 3)).astype("float32"))
    assert {v.dtype for v in student.variables} == {"float16"}
    assert {v.dtype for v in averaged.averaged_variables} == {"float32"}
    expected, _ = numpy_replay(initial, recorded, {"decay": 0.5}, [True] * 4)
    for average, reference in zip(averaged.averaged_variables, expected, strict=True):
        np.testing.assert_allclose(value_of(average), reference, rtol=1e-6, atol=1e-6)
    out = averaged(rng.normal(size=(2, 4)).astype("float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float16"


def test_mixed_float16_policy(rng):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        _, averaged, initial, recorded = train_and_record({"decay": 0.5}, rng)
    finally:
        keras.config.set_dtype_policy("float32")
    assert {v.dtype for v in averaged.averaged_variables} == {"float32"}
    expected, _ = numpy_replay(initial, recorded, {"decay": 0.5}, [True] * 8)
    for average, reference in zip(averaged.averaged_variables, expected, strict=True):
        np.testing.assert_allclose(value_of(average), reference, rtol=1e-6, atol=1e-6)


def test_trainable_false_stops_updates_but_not_the_student(rng):
    student = make_student()
    averaged = AveragedModel(student, decay=0.5)
    averaged.trainable = False
    assert student.trainable and all(layer.trainable for layer in student.layers)
    x = rng.normal(size=(4, 4)).astype("float32")
    averaged(x, training=True)
    assert state_snapshot(averaged)["step"] == 0
    averaged.trainable = True
    averaged.freeze_state()
    averaged(x, training=True)
    assert state_snapshot(averaged)["step"] == 0


def test_reset_state_copies_the_student_again(rng):
    student, averaged, _, _ = train_and_record({"decay": 0.9}, rng, steps=3)
    averaged.reset_state()
    for variable, average in zip(
        student.variables, averaged.averaged_variables, strict=True
    ):
        np.testing.assert_array_equal(value_of(average), value_of(variable))
    assert (
        state_snapshot(averaged)["step"] == 0
        and state_snapshot(averaged)["num_updates"] == 0
    )


def test_state_contract():
    check_state_contract(
        lambda: AveragedModel(make_student(), decay=0.5),
        np.random.default_rng(1).normal(size=(8, 4)).astype("float32"),
    )


def test_state_contract_swa_with_training_mode():
    check_state_contract(
        lambda: AveragedModel(make_student(), mode="swa", training_mode=True),
        np.random.default_rng(2).normal(size=(8, 4)).astype("float32"),
        mixed_precision_policies=("mixed_float16",),
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decay": 1.5}, r"decay=1\.5.*AveragedModel\(encoder, decay=0\.999\)"),
        ({"schedule": "cosine"}, r"total_steps=None.*total_steps=10000"),
        ({"schedule": "linear"}, r"schedule='linear'"),
        ({"mode": "polyak"}, r"mode='polyak'"),
        ({"update_every": 0}, r"update_every=0"),
        ({"mode": "swa", "warmup": True}, r"mode=\"swa\".*swa_start=750"),
        ({"warmup": True, "schedule": "cosine", "total_steps": 3}, r"not both"),
        ({"warmup": True, "min_decay": 0.9, "decay": 0.5}, r"min_decay=0\.9"),
    ],
)
def test_bad_arguments_say_what_to_write(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AveragedModel(make_student(), **kwargs)


def test_not_a_layer_is_refused():
    with pytest.raises(TypeError, match=r"received function.*AveragedModel\(encoder\)"):
        AveragedModel(lambda x: x)


def guide_blocks():
    guide = (ROOT / "docs" / "weight-averaging.md").read_text()
    return re.findall(r"```python\n(.*?)```", guide, re.S)


def run_guide_block(marker):
    (code,) = [block for block in guide_blocks() if marker in block]
    namespace = {}
    exec(compile(code, "docs/weight-averaging.md", "exec"), namespace)
    return namespace


def test_guide_callback_logs_the_averaged_models_validation_metrics():
    ns = run_guide_block("class EvaluateAveragedModel")
    accuracies = ns["history"].history["val_averaged_accuracy"]
    assert len(accuracies) == 3 and all(0.0 <= a <= 1.0 for a in accuracies)
    final = ns["averaged_model"].evaluate(ns["x"], ns["y"], verbose=0, return_dict=True)
    np.testing.assert_allclose(accuracies[-1], final["accuracy"], rtol=1e-6)
    assert state_snapshot(ns["averaged"])["step"] == 3 * 8


def test_guide_swa_recipe_recomputes_the_statistics_of_the_average():
    ns = run_guide_block("keras_stateful.calibrate(swa_model")
    swa, swa_model = ns["swa"], ns["swa_model"]
    assert state_snapshot(swa)["num_updates"] == 3  # steps 17, 33 and 49
    kernel, bias = (value_of(v) for v in swa_model.layers[0].weights)
    np.testing.assert_allclose(
        value_of(kernel), value_of(swa.averaged_variables[0]), rtol=0
    )
    features = ns["x_train"].astype("float64") @ kernel + bias
    np.testing.assert_allclose(
        value_of(swa_model.layers[1].moving_mean),
        features.mean(0),
        rtol=1e-5,
        atol=1e-5,
    )


def test_moco_demo_runs(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "moco_digits.py"),
            "--epochs=2",
            f"--out={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "KERAS_BACKEND": keras.backend.backend(),
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), os.environ.get("PYTHONPATH", "")]
            ),
        },
        timeout=600,
        check=True,
    )
    assert "key encoder updates: 18" in result.stdout  # 2 epochs of 9 batches
    assert "MoCo v2 (no labels)" in result.stdout
    assert (tmp_path / "moco_digits.png").stat().st_size > 10_000


# name: (student value, average value, decay, whether the new values are finite)
FLOAT32_MAX = float(np.finfo("float32").max)
EXTREME_STUDENTS = {
    "nan": (np.nan, 0.5, 0.9, False),
    "inf": (-np.inf, 0.5, 0.9, False),
    "nan_average": (0.5, np.nan, 0.9, False),
    # Finite, beyond any bound a backend checks cheaply: the new values
    # decide (the average of MAX and MAX is MAX).
    "largest_finite": (FLOAT32_MAX, FLOAT32_MAX, 0.5, True),
}


@pytest.mark.parametrize("name", sorted(EXTREME_STUDENTS))
@pytest.mark.parametrize(
    "jit_compile",
    ["auto", False] + ([True] if keras.backend.backend() != "torch" else []),
)
def test_update_in_fit_is_skipped_exactly_when_a_new_value_is_not_finite(
    name, jit_compile, rng
):
    student_value, average_value, decay, finite = EXTREME_STUDENTS[name]
    student = make_student(batch_norm=False)
    averaged = AveragedModel(student, decay=decay)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, [student(inputs), averaged(inputs)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=["mse", None],
        jit_compile=jit_compile,
    )
    x, y = rng.normal(size=(4, 4)).astype("float32"), np.ones((4, 3), "float32")
    model.train_on_batch(x, y)  # the first update copies the student
    # Written where the next training step reads them (not a training step).
    kernel, average = student.layers[0].kernel, averaged.averaged_variables[0]
    poisoned = value_of(kernel).copy()
    poisoned[1, 2] = student_value
    kernel.assign(poisoned)
    set_to = value_of(average).copy()
    set_to[1, 2] = average_value
    average.assign(set_to)
    before = state_snapshot(averaged)
    model.train_on_batch(x, y)
    after = state_snapshot(averaged)
    assert averaged.skipped_updates == (0 if finite else 1)
    if finite:
        assert after["num_updates"] == 2
        assert value_of(average)[1, 2] == FLOAT32_MAX
    else:
        for key in before:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
