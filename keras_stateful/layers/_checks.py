"""Checks of layer arguments, shared by every layer.

Each check returns the argument as a plain Python `int` or `float` (so that
`get_config()` stays JSON-serialisable) or raises an error that says what
was received, what is expected, and the line to write instead, e.g.

    MemoryQueue: size must be an int >= 1 (the number of keys kept);
    received size=2.5. Write e.g. `MemoryQueue(65536)`.

Counts and other integers are Python or NumPy integers; a bool (`True` is
an `int` to Python) and a float (even `8.0`) are refused.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import keras
import numpy as np
from keras import ops

from keras_stateful import _backend

_T = TypeVar("_T")

_MOMENTUM_NOTE = (
    "Keras's convention: 0.99 keeps 99% of the old value (PyTorch's momentum=0.01)."
)


def integer(
    value: Any,
    name: str,
    *,
    layer: str,
    example: str,
    minimum: int | None = None,
    maximum: int | None = None,
    meaning: str = "",
    or_none: str = "",
    error: type[Exception] = ValueError,
) -> int:
    """`value` as an `int`, if it is an integer (not a bool) within the bounds.

    Args:
        value: The argument as received.
        name: The argument's name, e.g. `"num_classes"`.
        layer: The layer's class name, which starts the message.
        example: The line to write instead, e.g. `"CenterLoss(10)"`.
        minimum: Smallest value allowed. Defaults to `None` (no bound).
        maximum: Largest value allowed. Defaults to `None` (no bound).
        meaning: What the number is, shown after the bounds. Defaults to `""`.
        or_none: What `None` means, where `None` is accepted too (see
            `optional`). Defaults to `""`.
        error: The exception to raise. Defaults to `ValueError`.

    Example:

    ```python
    self.size = integer(size, "size", layer="MemoryQueue",
                        example="MemoryQueue(65536)", minimum=1)
    ```
    """
    bounds = _bounds(minimum, maximum, None, None)
    # "an int >= 1", "an integer in [2, 16]", "an int"
    expected = f"an {'integer' if bounds.startswith('in') else 'int'} {bounds}".strip()
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not (is_int and _within(value, minimum, maximum)):
        _refuse(value, name, layer, example, expected, meaning, or_none, "", error)
    return int(value)


def number(
    value: Any,
    name: str,
    *,
    layer: str,
    example: str,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: float | None = None,
    exclusive_maximum: float | None = None,
    meaning: str = "",
    or_none: str = "",
    note: str = "",
) -> float:
    """`value` as a `float`, if it is a real number (not a bool) within the bounds.

    NaN is never within bounds. Raises a `ValueError` otherwise.

    Args:
        value: The argument as received.
        name: The argument's name, e.g. `"epsilon"`.
        layer: The layer's class name, which starts the message.
        example: The line to write instead, e.g. `"VectorQuantizerEMA(512,
            64, epsilon=1e-5)"`.
        minimum: Smallest value allowed (`>=`). Defaults to `None`.
        maximum: Largest value allowed (`<=`). Defaults to `None`.
        exclusive_minimum: A bound the value must be above (`>`). Defaults to
            `None`.
        exclusive_maximum: A bound the value must be below (`<`). Defaults to
            `None`.
        meaning: What the number is, shown after the bounds. Defaults to `""`.
        or_none: What `None` means, where `None` is accepted too (see
            `optional`). Defaults to `""`.
        note: A sentence after the line to write, e.g. a convention.
            Defaults to `""`.

    Example:

    ```python
    self.epsilon = number(epsilon, "epsilon", layer="RunningStandardization",
                          example="RunningStandardization(epsilon=1e-8)",
                          minimum=0.0)
    ```
    """
    bounds = _bounds(minimum, maximum, exclusive_minimum, exclusive_maximum)
    expected = bounds or "a number"
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (
        is_real
        and _within(value, minimum, maximum)
        and (exclusive_minimum is None or value > exclusive_minimum)
        and (exclusive_maximum is None or value < exclusive_maximum)
    ):
        _refuse(value, name, layer, example, expected, meaning, or_none, note)
    return float(value)


def momentum(
    value: Any,
    name: str = "momentum",
    *,
    layer: str,
    example: str,
    or_none: str = "",
) -> float:
    """`value` as a `float` in `[0, 1)`, the weight of the old value (Keras's
    convention); the error explains the convention.

    Args:
        value: The argument as received.
        name: The argument's name. Defaults to `"momentum"`.
        layer: The layer's class name, which starts the message.
        example: The line to write instead.
        or_none: What `None` means, where `None` is accepted too (see
            `optional`). Defaults to `""`.

    Example:

    ```python
    self.momentum = momentum(momentum, layer="MovingAverage",
                             example="MovingAverage(momentum=0.99)")
    ```
    """
    return number(
        value,
        name,
        layer=layer,
        example=example,
        minimum=0.0,
        exclusive_maximum=1.0,
        or_none=or_none,
        note=_MOMENTUM_NOTE,
    )


def optional(
    check: Callable[..., _T], value: Any, name: str, *, or_none: str, **kwargs: Any
) -> _T | None:
    """`None` if `value` is None, else `check(value, name, **kwargs)`, whose
    error then says that `None` is accepted too, and what it means.

    Args:
        check: `integer`, `number` or `momentum`.
        value: The argument as received.
        name: The argument's name.
        or_none: What `None` means, e.g. `"None (no clipping)"`.
        **kwargs: The other arguments of `check`.

    Example:

    ```python
    self.clip = optional(number, clip, "clip", or_none="None (no clipping)",
                         layer="RunningStandardization",
                         example="RunningStandardization(clip=10.0)",
                         exclusive_minimum=0.0)
    ```
    """
    if value is None:
        return None
    return check(value, name, or_none=or_none, **kwargs)


def _bounds(
    minimum: float | None,
    maximum: float | None,
    exclusive_minimum: float | None,
    exclusive_maximum: float | None,
) -> str:
    """The bounds in words: `in [0, 1)`, `> 0`, `>= 1`, `<= 1`, or `""`."""
    low = (
        (">", "(", exclusive_minimum)
        if exclusive_minimum is not None
        else (">=", "[", minimum)
        if minimum is not None
        else None
    )
    high = (
        ("<", ")", exclusive_maximum)
        if exclusive_maximum is not None
        else ("<=", "]", maximum)
        if maximum is not None
        else None
    )
    if low and high:
        return f"in {low[1]}{_show(low[2])}, {_show(high[2])}{high[1]}"
    side = low or high
    return f"{side[0]} {_show(side[2])}" if side else ""


def _show(bound: Any) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def _within(value: Any, minimum: float | None, maximum: float | None) -> bool:
    return (minimum is None or value >= minimum) and (
        maximum is None or value <= maximum
    )


def _refuse(
    value: Any,
    name: str,
    layer: str,
    example: str,
    expected: str,
    meaning: str,
    or_none: str,
    note: str,
    error: type[Exception] = ValueError,
) -> NoReturn:
    must = expected + (f" ({meaning})" if meaning else "")
    must += f" or {or_none}" if or_none else ""
    raise error(
        f"{layer}: {name} must be {must}; received {name}={value!r}. Write "
        f"e.g. `{example}`." + (f" {note}" if note else "")
    )


def integer_ids(ids: Any, layer: str, what: str, fix: str) -> Any:
    """Integer ids of shape (B,) or (B, 1) as int32 `(B,)`, or a clear error.

    `what` names them in the message ("class-id labels"), `fix` is the line
    to write instead. The shape is the caller's to check first.
    """
    dtype = keras.backend.standardize_dtype(ids.dtype)
    if "int" not in dtype:
        raise TypeError(
            f"Layer '{layer}': {what} must be integers; received dtype {dtype}. {fix}"
        )
    return ops.cast(ops.reshape(ids, (-1,)), "int32")


def ids_in_range(ids: Any, size: int, layer: str, what: str, fix: str) -> None:
    """Eagerly, an error naming the ids outside `[0, size)`.

    In compiled code (the values are not known) it checks nothing: the
    layers leave such ids out of the update and count them.
    """
    if not _backend.is_concrete(ids):
        return
    values = np.asarray(ops.convert_to_numpy(ids))
    bad = values[(values < 0) | (values >= size)]
    if bad.size:
        more = " and more" if bad.size > 5 else ""
        raise ValueError(
            f"Layer '{layer}': {what} in [0, {size}); received "
            f"{bad[:5].tolist()}{more}. {fix}"
        )
