"""Layer arguments: one rule for counts and numbers, and errors that say what to write.

Counts are Python or NumPy integers: a bool (`True` is an `int` to Python)
and a float (even an integral one) are refused by every layer, with a
message that shows what was received, what is expected and a line to
write instead.
"""

import json
import re

import numpy as np
import pytest

from keras_stateful import layers
from keras_stateful.layers import _checks

# (make the layer, the whole message it must raise)
REFUSED = {
    "center_loss_true": (
        lambda: layers.CenterLoss(True),
        "CenterLoss: num_classes must be an int >= 1 (the number of classes K); "
        "received num_classes=True. Write e.g. `CenterLoss(10)`.",
    ),
    "center_loss_2.7": (
        lambda: layers.CenterLoss(2.7),
        "CenterLoss: num_classes must be an int >= 1 (the number of classes K); "
        "received num_classes=2.7. Write e.g. `CenterLoss(10)`.",
    ),
    "center_loss_string": (
        lambda: layers.CenterLoss("10"),
        "received num_classes='10'. Write e.g. `CenterLoss(10)`.",
    ),
    "center_loss_zero": (lambda: layers.CenterLoss(0), "received num_classes=0."),
    "memory_queue_true": (
        lambda: layers.MemoryQueue(True),
        "MemoryQueue: size must be an int >= 1 (the number of keys kept); "
        "received size=True. Write e.g. `MemoryQueue(65536)`.",
    ),
    "memory_queue_integral_float": (
        lambda: layers.MemoryQueue(4.0),
        "received size=4.0.",
    ),
    "vq_true": (
        lambda: layers.VectorQuantizerEMA(True, 4),
        "VectorQuantizerEMA: num_embeddings must be an int >= 1; received "
        "num_embeddings=True. Write e.g. `VectorQuantizerEMA(num_embeddings=512, "
        "embedding_dim=64)`.",
    ),
    "vq_dim_2.7": (
        lambda: layers.VectorQuantizerEMA(8, 2.7),
        "embedding_dim must be an int >= 1; received embedding_dim=2.7.",
    ),
    "vq_seed_true": (
        lambda: layers.VectorQuantizerEMA(8, 4, seed=True),
        "seed must be an int or None (a seed drawn now); received seed=True. "
        "Write e.g. `VectorQuantizerEMA(num_embeddings=512, embedding_dim=64, "
        "seed=0)`.",
    ),
    "vq_decay_true": (
        lambda: layers.VectorQuantizerEMA(8, 4, decay=True),
        "decay must be in [0, 1); received decay=True.",
    ),
    "vq_epsilon_nan": (
        lambda: layers.VectorQuantizerEMA(8, 4, epsilon=float("nan")),
        "epsilon must be > 0 (it keeps unused codes from a division by zero); "
        "received epsilon=nan. Write e.g. `VectorQuantizerEMA(num_embeddings=512, "
        "embedding_dim=64, epsilon=1e-5)`.",
    ),
    "fake_quant_num_bits_true": (
        lambda: layers.FakeQuant(True),
        "FakeQuant: num_bits must be an integer in [2, 16]; received num_bits=True. "
        "Write e.g. `FakeQuant(num_bits=8)`.",
    ),
    "moving_average_momentum_string": (
        lambda: layers.MovingAverage("0.9"),
        "MovingAverage: momentum must be in [0, 1); received momentum='0.9'. "
        "Write e.g. `MovingAverage(momentum=0.99)`. Keras's convention: 0.99 "
        "keeps 99% of the old value (PyTorch's momentum=0.01).",
    ),
    "moving_moments_momentum_false": (
        lambda: layers.MovingMoments(momentum=False),
        "MovingMoments: momentum must be in [0, 1) or None (the cumulative "
        "average); received momentum=False. Write e.g. "
        "`MovingMoments(momentum=0.99)`.",
    ),
    "running_standardization_epsilon": (
        lambda: layers.RunningStandardization(epsilon=-1.0),
        "RunningStandardization: epsilon must be >= 0; received epsilon=-1.0. "
        "Write e.g. `RunningStandardization(epsilon=1e-8)`.",
    ),
    "running_standardization_clip": (
        lambda: layers.RunningStandardization(clip=0.0),
        "RunningStandardization: clip must be > 0 or None (no clipping); "
        "received clip=0.0. Write e.g. `RunningStandardization(clip=10.0)`.",
    ),
}

# Integer arguments whose type is wrong raise a TypeError, as before.
REFUSED_AS_TYPE = {
    "fake_quant_axis_true": (
        lambda: layers.FakeQuant(axis=True),
        "FakeQuant: axis must be an int (the channel axis) or None (one range "
        "per tensor); received axis=True. Write e.g. `FakeQuant(axis=-1)`.",
    ),
    "fake_quant_quant_max_float": (
        lambda: layers.FakeQuant(quant_min=-127, quant_max=127.0),
        "FakeQuant: quant_max must be an int; received quant_max=127.0. Write "
        "e.g. `FakeQuant(scheme='symmetric', quant_min=-127, quant_max=127)`.",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_bad_arguments_are_refused_with_what_to_write(case):
    make, message = REFUSED[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("case", REFUSED_AS_TYPE)
def test_arguments_of_the_wrong_type_raise_type_errors(case):
    make, message = REFUSED_AS_TYPE[case]
    with pytest.raises(TypeError, match=re.escape(message)):
        make()


def test_numpy_integers_are_counts_and_stored_as_python_ints():
    made = [
        layers.CenterLoss(np.int64(3)),
        layers.MemoryQueue(np.int32(4)),
        layers.VectorQuantizerEMA(np.int64(8), np.int16(4), seed=np.int64(1)),
        layers.FakeQuant(
            np.int8(4), axis=np.int64(-1), quant_min=np.int32(-7), quant_max=7
        ),
    ]
    stored = [
        made[0].num_classes,
        made[1].size,
        made[2].num_embeddings,
        made[2].embedding_dim,
        made[2].seed,
        made[3].num_bits,
        made[3].axis,
        made[3].quant_min,
    ]
    assert stored == [3, 4, 8, 4, 1, 4, -1, -7]
    assert all(type(value) is int for value in stored)
    for layer in made:
        json.dumps(layer.get_config())  # a NumPy integer would not serialise


def test_numpy_floats_are_numbers_and_stored_as_python_floats():
    layer = layers.MovingMoments(momentum=np.float32(0.5))
    assert layer.momentum == 0.5 and type(layer.momentum) is float
    layer = layers.RunningStandardization(
        epsilon=np.float64(1e-3), clip=np.float32(2.0)
    )
    assert (layer.epsilon, layer.clip) == (1e-3, 2.0)
    json.dumps(layer.get_config())


@pytest.mark.parametrize(
    "bounds, phrase",
    [
        ({"minimum": 0.0, "exclusive_maximum": 1.0}, "in [0, 1)"),
        ({"minimum": 0.0, "maximum": 1.0}, "in [0, 1]"),
        ({"exclusive_minimum": 0.0, "maximum": 2.5}, "in (0, 2.5]"),
        ({"exclusive_minimum": 0.0}, "> 0"),
        ({"minimum": 1e-8}, ">= 1e-08"),
        ({"maximum": 1.0}, "<= 1"),
        ({"exclusive_maximum": 1.0}, "< 1"),
        ({}, "a number"),
    ],
)
def test_number_says_its_bounds(bounds, phrase):
    expected = f"Layer: x must be {phrase}; received x='a'. Write e.g. `Layer(x=1)`."
    with pytest.raises(ValueError, match=re.escape(expected)):
        _checks.number("a", "x", layer="Layer", example="Layer(x=1)", **bounds)


@pytest.mark.parametrize(
    "value, within",
    [(0.0, True), (0.999, True), (1.0, False), (-0.0, True), (-1e-9, False)],
)
def test_number_keeps_to_a_half_open_interval(value, within):
    def check():
        return _checks.number(
            value, "m", layer="L", example="L(0.5)", minimum=0.0, exclusive_maximum=1.0
        )

    if within:
        assert check() == value
    else:
        with pytest.raises(ValueError, match=f"received m={value!r}"):
            check()


@pytest.mark.parametrize("value", [2, 16, np.uint8(9)])
def test_integer_accepts_its_closed_range(value):
    checked = _checks.integer(
        value, "n", layer="L", example="L(8)", minimum=2, maximum=16
    )
    assert checked == value and type(checked) is int


@pytest.mark.parametrize("value", [1, 17, 8.0, True, np.True_, "8", None])
def test_integer_refuses_the_rest(value):
    with pytest.raises(ValueError, match=r"n must be an integer in \[2, 16\]"):
        _checks.integer(value, "n", layer="L", example="L(8)", minimum=2, maximum=16)


def test_optional_passes_none_and_names_it_in_the_error():
    kwargs = {"layer": "L", "example": "L(clip=1.0)", "exclusive_minimum": 0.0}
    assert (
        _checks.optional(_checks.number, None, "clip", or_none="None", **kwargs) is None
    )
    assert _checks.optional(_checks.number, 3, "clip", or_none="None", **kwargs) == 3.0
    with pytest.raises(ValueError, match=r"> 0 or None \(off\); received clip=-1"):
        _checks.optional(_checks.number, -1, "clip", or_none="None (off)", **kwargs)
