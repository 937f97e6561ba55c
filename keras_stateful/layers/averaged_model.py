"""`AveragedModel`: an averaged copy of a layer's weights (EMA, BYOL, SWA)."""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from keras_stateful import _backend
from keras_stateful.layers import _checks
from keras_stateful.stateful_layer import StatefulLayer, _all_finite, next_count
from keras_stateful.types import Tensor

_LAYER = "AveragedModel"
_SCHEDULES = ("constant", "cosine")
_MODES = ("ema", "swa")


@keras.saving.register_keras_serializable(package="keras_stateful")
class AveragedModel(StatefulLayer):
    """An averaged copy of a layer's weights, updated in training; its forward pass.

    Wraps any Keras layer or model, the "student", and keeps one float32
    copy of each of its variables, `averaged.averaged_variables`, in the
    order of `layer.variables`. Calling the wrapper runs the student with
    the averaged values in place of its own (through a `keras.StatelessScope`:
    the student's variables are never swapped, read for the output or
    written) and cuts the result from the gradient: the EMA teacher of Mean
    Teacher, BYOL and DINO, the momentum key encoder of MoCo, the EMA model
    that timm evaluates, the SWA average.

    In a training call, with `w` the student's values as this step's forward
    pass reads them (before the optimizer's update of the step, so the
    average lags the student by one step, as in MoCo's momentum update),
    `t` the number of training calls so far including this one and `n` the
    number of updates already made:

    - float variables: `avg = decay_t * avg + (1 - decay_t) * w`, with
      `decay_t = 0` for the first update (`n = 0`: a copy);
    - integer and bool variables (seeds, counters): `avg = w`;
    - non-trainable float variables (BatchNormalization statistics) are
      averaged like the weights, or copied with
      `average_non_trainable=False`.

    Updates happen at the steps `s = t - start - 1 >= 0` with
    `s % update_every == 0` (`start` is `update_after_step`, or `swa_start`
    in SWA mode); the update comes first and the output is computed with the
    new average. `decay_t` is, by schedule:

    - constant (default): `decay`;
    - `warmup=True` (timm's `ModelEmaV3`):
      `clip(1 - (1 + s / warmup_gamma) ** -warmup_power, min_decay, decay)`;
    - `schedule="cosine"` (BYOL):
      `1 - (1 - decay) * (cos(pi * min(n, total_steps) / total_steps) + 1) / 2`;
    - `mode="swa"`: `n / (n + 1)`, the equal average of the updates
      (`avg = avg + (w - avg) / (n + 1)`).

    At build the average is set to the student's values (so before the
    first update the wrapper computes what the student computes, as
    PyTorch's `AveragedModel` and timm's `ModelEmaV3`, which start from a
    copy); `reset_state()` copies the student's current values again and
    sets the counters `step` and `num_updates` to zero.

    Each training call of the wrapper is one step: call it once per training
    step (a model whose two branches both call it makes two updates a step).
    A student shared by several branches is read once per call of the
    wrapper, however often the model calls the student.

    **`trainable=False`** on the wrapper stops the updates (recompile after
    changing it) and, unlike on other Keras layers, is not passed on to the
    student, which keeps training; `freeze_state()` stops the updates while
    training goes on. The student's variables are tracked by the wrapper (so
    that a model holding only the wrapper saves them), and receive no
    gradient through it.

    Args:
        layer: The student, a built or buildable Keras layer or model.
        decay: The weight of the old average, in `[0, 1]`; the largest one
            with `warmup=True`, the base one with `schedule="cosine"`.
            Defaults to `0.999`.
        warmup: Whether to use timm's warmup of the decay. Defaults to
            `False`.
        warmup_gamma: timm's `warmup_gamma`, > 0. Defaults to `1.0`.
        warmup_power: timm's `warmup_power`, > 0. Defaults to `2/3`.
        min_decay: The smallest decay with `warmup=True`, in `[0, decay]`.
            Defaults to `0.0`.
        update_after_step: EMA modes: no update while
            `t <= update_after_step`. Defaults to `0`.
        schedule: `"constant"` or `"cosine"` (BYOL's). Defaults to
            `"constant"`.
        total_steps: The number of updates `K` of the cosine schedule.
            Required with `schedule="cosine"`. Defaults to `None`.
        mode: `"ema"` or `"swa"` (the equal average). Defaults to `"ema"`.
        swa_start: SWA mode: no update while `t <= swa_start`. Defaults
            to `0`.
        update_every: Update every this many training steps (DreamerV3's
            slow critic, SWA's once per epoch). Defaults to `1`.
        average_non_trainable: Whether non-trainable float variables
            (BatchNormalization's moving statistics) are averaged (`True`,
            like PyTorch's `AveragedModel(use_buffers=True)`) or copied from
            the student at each update (`False`, like timm's
            `ModelEmaV3(exclude_buffers=True)`). Defaults to `True`.
        training_mode: Whether the student runs in training mode in the
            wrapper's training calls, as MoCo's key encoder does: its
            BatchNormalization then normalises with the batch statistics and
            its Dropout drops. The values it would write into its
            non-trainable state (moving statistics) are discarded; the
            averaged statistics come only from the student's own. In other
            calls it always runs in inference mode. Defaults to `False`.
        **kwargs: `StatefulLayer` arguments (`guard_non_finite`, `name`, ...).

    Call arguments:
        inputs: The student's inputs.
        training: Whether the call is in training mode (updates the average).

    Example:

    ```python
    student = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    teacher = keras_stateful.layers.AveragedModel(student, decay=0.9)
    x = np.ones((4, 3), "float32")
    kernel = keras.ops.convert_to_numpy(student.layers[0].kernel)
    teacher(x, training=True)  # first update: a copy of the student
    student.layers[0].kernel.assign(np.zeros((3, 2)))  # as an optimizer step would
    teacher(x, training=True)  # averaged kernel: 0.9 * kernel + 0.1 * 0
    outputs = teacher(x)  # the student's function with the averaged weights
    ```

    Reference:
        - [Tarvainen & Valpola, Mean teachers are better role models, 2017](https://arxiv.org/abs/1703.01780)
        - [He et al., Momentum Contrast (MoCo), 2020](https://arxiv.org/abs/1911.05722)
        - [Grill et al., Bootstrap Your Own Latent (BYOL), 2020](https://arxiv.org/abs/2006.07733)
        - [Izmailov et al., Averaging Weights Leads to Wider Optima (SWA), 2018](https://arxiv.org/abs/1803.05407)
        - [PyTorch `AveragedModel`](https://pytorch.org/docs/stable/optim.html#weight-averaging-swa-and-ema),
          [timm `ModelEmaV3`](https://github.com/huggingface/pytorch-image-models/blob/main/timm/utils/model_ema.py)
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        decay: float = 0.999,
        *,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        schedule: str = "constant",
        total_steps: int | None = None,
        mode: str = "ema",
        swa_start: int = 0,
        update_every: int = 1,
        average_non_trainable: bool = True,
        training_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                f"{_LAYER}: `layer` must be a Keras layer or model; received "
                f"{type(layer).__name__}. Write e.g. `AveragedModel(encoder)` "
                "with `encoder = keras.Sequential([...])`."
            )
        self.layer = layer
        self.decay = _checks.number(
            decay, "decay", layer=_LAYER, example="AveragedModel(encoder, decay=0.999)",
            minimum=0.0, maximum=1.0,
        )  # fmt: skip
        self.warmup = bool(warmup)
        self.warmup_gamma = _checks.number(
            warmup_gamma, "warmup_gamma", layer=_LAYER, exclusive_minimum=0.0,
            example="AveragedModel(encoder, warmup=True, warmup_gamma=1.0)",
        )  # fmt: skip
        self.warmup_power = _checks.number(
            warmup_power, "warmup_power", layer=_LAYER, exclusive_minimum=0.0,
            example="AveragedModel(encoder, warmup=True, warmup_power=2/3)",
        )  # fmt: skip
        self.min_decay = _checks.number(
            min_decay, "min_decay", layer=_LAYER, minimum=0.0, maximum=self.decay,
            meaning="(at most `decay`)",
            example="AveragedModel(encoder, warmup=True, min_decay=0.0)",
        )  # fmt: skip
        self.update_after_step = _checks.integer(
            update_after_step, "update_after_step", layer=_LAYER, minimum=0,
            example="AveragedModel(encoder, update_after_step=100)",
        )  # fmt: skip
        self.schedule = _choice(schedule, "schedule", _SCHEDULES)
        self.total_steps = _checks.optional(
            _checks.integer, total_steps, "total_steps", layer=_LAYER, minimum=1,
            or_none="None (no cosine schedule)",
            example='AveragedModel(encoder, schedule="cosine", total_steps=10000)',
        )  # fmt: skip
        self.mode = _choice(mode, "mode", _MODES)
        self.swa_start = _checks.integer(
            swa_start, "swa_start", layer=_LAYER, minimum=0,
            example='AveragedModel(model, mode="swa", swa_start=750)',
        )  # fmt: skip
        self.update_every = _checks.integer(
            update_every, "update_every", layer=_LAYER, minimum=1,
            example="AveragedModel(critic, decay=0.98, update_every=50)",
        )  # fmt: skip
        self.average_non_trainable = bool(average_non_trainable)
        self.training_mode = bool(training_mode)
        self._check_combination()
        self.averaged_variables: list[keras.Variable] = []
        self.step = None
        self.num_updates = None
        self._at_write = _AtWrite()

    def _check_combination(self) -> None:
        if self.schedule == "cosine" and self.total_steps is None:
            raise ValueError(
                f'{_LAYER}: schedule="cosine" needs `total_steps` (the number '
                "of updates K of BYOL's schedule); received total_steps=None. "
                'Write `AveragedModel(encoder, schedule="cosine", '
                "total_steps=10000)`."
            )
        if self.warmup and self.schedule == "cosine":
            raise ValueError(
                f'{_LAYER}: choose warmup=True or schedule="cosine", not both; '
                "received both. Write `AveragedModel(encoder, warmup=True)` "
                'or `AveragedModel(encoder, schedule="cosine", total_steps=K)`.'
            )
        if self.mode == "swa" and (
            self.warmup or self.schedule != "constant" or self.update_after_step
        ):
            raise ValueError(
                f'{_LAYER}: mode="swa" is the equal average, without a decay '
                f"schedule; received warmup={self.warmup}, schedule="
                f"{self.schedule!r}, update_after_step={self.update_after_step}. "
                'Write `AveragedModel(model, mode="swa", swa_start=750)`.'
            )

    # ------------------------------------------------------------------ trainable

    @property
    def trainable(self) -> bool:
        return bool(self._trainable)

    @trainable.setter
    def trainable(self, value: bool) -> None:
        # Keras passes `trainable` on to sublayers; the student keeps its own.
        self._trainable = bool(value)

    # ---------------------------------------------------------------------- build

    def build(self, input_shape: Any) -> None:
        if not self.layer.built:
            self.layer.build(input_shape)
        if not self.layer.built or not self.layer.variables:
            raise ValueError(
                f"{_LAYER}: the wrapped layer '{self.layer.name}' has no "
                f"variables after build({input_shape}). Build it first, e.g. "
                "call it once on a batch or give a Sequential a `keras.Input`."
            )
        self.averaged_variables = [
            self.add_state(
                f"average_{position}_{variable.name}",
                variable.shape,
                initializer=_copy_of(variable),
                dtype=_average_dtype(variable),
            )
            for position, variable in enumerate(self.layer.variables)
        ]
        self.step = self.add_state("step", (), dtype="int32")
        self.num_updates = self.add_state("num_updates", (), dtype="int32")
        # Checked by Keras before `call`: inputs the student would refuse are
        # refused before the average moves, in an error naming the wrapper.
        self.input_spec = self.layer.input_spec
        # With accumulation_steps=N: one update per window of N micro-batches
        # (the student's weights do not change within it), at its last one.
        self.add_statistic("micro_batches")

    # ----------------------------------------------------------------------- call

    def call(self, inputs: Any, training: bool | Tensor | None = None) -> Any:
        if self.may_update(training):
            self._update(training)
        student_training: Any = self.training_mode and self.may_update(training)
        if ops.is_tensor(training) and self.training_mode:
            student_training = training
        return self._averaged_forward(inputs, student_training)

    def _update(self, training: bool | Tensor) -> None:
        self.accumulate({"micro_batches": ops.ones(())}, training=training)
        step = next_count(self.step)
        count = _backend.read_value(self.num_updates)
        due, weight = self._due_and_weight(step, count)
        pairs = list(zip(self.averaged_variables, self.layer.variables, strict=True))
        olds = [_backend.read_value(average) for average, _ in pairs]
        students = [
            ops.cast(_backend.read_stored_value(variable), average.dtype)
            for average, variable in pairs
        ]
        averaged = [self._is_averaged(average, variable) for average, variable in pairs]
        chosen = [i for i, a in enumerate(averaged) if a]
        if _backend.averages_at_write([olds[i] for i in chosen]):
            # The commit writes the averages in place (`_write`); its values
            # here stand for them.
            means = [olds[i] for i in chosen]
            finite = None
            if self.guard_non_finite:
                finite = _backend.averages_finite(
                    means, [students[i] for i in chosen], weight
                )
            self._at_write.weight = weight
            self._at_write.students = {id(pairs[i][0]): students[i] for i in chosen}
        else:
            means, finite = _backend.weighted_averages(
                [olds[i] for i in chosen],
                [students[i] for i in chosen],
                weight,
                check=self.guard_non_finite,
            )
        next_mean = iter(means)
        new_values = [
            next(next_mean) if a else ops.where(due, student, old)
            for old, student, a in zip(olds, students, averaged, strict=True)
        ]
        if finite is not None:
            copies = [
                value
                for value, a in zip(new_values, averaged, strict=True)
                if not a and keras.backend.is_float_dtype(value.dtype)
            ]
            copies_finite = _all_finite(copies, _backend.writes_in_place())
            if copies_finite is not None:
                finite = ops.logical_and(finite, copies_finite)
        try:
            self.commit_state(
                *zip(self.averaged_variables, new_values, strict=True),
                (self.step, step),
                (self.num_updates, count + ops.cast(due, "int32")),
                training=training,
                finite=finite,
            )
        finally:
            self._at_write.students = {}

    def _due_and_weight(self, step: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """Whether this step updates, and the weight `1 - decay_t` of the student."""
        start = self.swa_start if self.mode == "swa" else self.update_after_step
        since = step - (start + 1)  # s
        due = ops.logical_and(
            since >= 0, ops.equal(ops.mod(ops.maximum(since, 0), self.update_every), 0)
        )
        count_f = ops.cast(count, "float32")
        if self.mode == "swa":
            weight = 1.0 / (count_f + 1.0)
        elif self.warmup:
            s = ops.cast(ops.maximum(since, 0), "float32")
            decay = 1.0 - ops.power(1.0 + s / self.warmup_gamma, -self.warmup_power)
            weight = 1.0 - ops.clip(decay, self.min_decay, self.decay)
        elif self.schedule == "cosine":
            total = float(self.total_steps or 1)
            k = ops.minimum(count_f, total)
            weight = (1.0 - self.decay) * (ops.cos(math.pi * k / total) + 1.0) / 2.0
        else:
            weight = ops.convert_to_tensor(1.0 - self.decay, "float32")
        weight = ops.where(ops.equal(count, 0), 1.0, weight)
        return due, ops.where(due, ops.cast(weight, "float32"), 0.0)

    def _is_averaged(self, average: keras.Variable, variable: keras.Variable) -> bool:
        """Whether `average` is a weighted average (else a copy of `variable`)."""
        if not keras.backend.is_float_dtype(average.dtype):
            return False
        return bool(variable.trainable or self.average_non_trainable)

    def _write(
        self,
        updates: Any,
        gate: Tensor,
        in_place: bool | None = None,
    ) -> None:
        at_write = self._at_write.students
        if at_write and any(id(update[0]) in at_write for update in updates):
            _backend.weighted_average_in_place_if(
                gate,
                [(u[0], at_write[id(u[0])]) for u in updates if id(u[0]) in at_write],
                self._at_write.weight,
            )
            updates = [u for u in updates if id(u[0]) not in at_write]
        # On TensorFlow one conditional assigns every new value when the gate
        # holds, instead of a `where` per variable: one pass over the 5M
        # weights fewer per step. Elsewhere `where` is fused into the update
        # (XLA) or written in place (PyTorch).
        whole = all(len(update) == 2 or update[1] is None for update in updates)
        if updates and whole and not in_place and _backend.assigns_under_condition():
            _backend.assign_all_if(
                gate,
                [
                    (update[0], self._stored_form(update[0], update[-1], False))
                    for update in updates
                ],
            )
            return
        if updates:
            super()._write(updates, gate, in_place)

    def _averaged_forward(self, inputs: Any, training: bool | Tensor) -> Any:
        mapping = [
            (variable, ops.cast(_backend.read_value(average), variable.dtype))
            for variable, average in zip(
                self.layer.variables, self.averaged_variables, strict=True
            )
        ]
        with keras.StatelessScope(state_mapping=mapping):
            if _takes_training(self.layer):
                outputs = self.layer(inputs, training=training)
            else:
                outputs = self.layer(inputs)
        return keras.tree.map_structure(ops.stop_gradient, outputs)

    def compute_output_spec(self, inputs: Any, training: Any = None) -> Any:
        return self.layer.compute_output_spec(inputs)

    # --------------------------------------------------------------------- config

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "layer": keras.saving.serialize_keras_object(self.layer),
            "decay": self.decay,
            "warmup": self.warmup,
            "warmup_gamma": self.warmup_gamma,
            "warmup_power": self.warmup_power,
            "min_decay": self.min_decay,
            "update_after_step": self.update_after_step,
            "schedule": self.schedule,
            "total_steps": self.total_steps,
            "mode": self.mode,
            "swa_start": self.swa_start,
            "update_every": self.update_every,
            "average_non_trainable": self.average_non_trainable,
            "training_mode": self.training_mode,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AveragedModel:
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)


class _AtWrite:
    """The students and weight of averages written in place by `_write`."""

    def __init__(self) -> None:
        self.students: dict[int, Tensor] = {}
        self.weight: Tensor | None = None


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(
            f"{_LAYER}: `{name}` must be one of {list(choices)}; received "
            f"{name}={value!r}. Write e.g. `AveragedModel(encoder, "
            f"{name}={choices[-1]!r})`."
        )
    return str(value)


def _average_dtype(variable: keras.Variable) -> str:
    """float32 for float variables, the variable's own dtype otherwise."""
    dtype = keras.backend.standardize_dtype(variable.dtype)
    return "float32" if keras.backend.is_float_dtype(dtype) else dtype


def _copy_of(variable: keras.Variable) -> Any:
    """An initializer that copies the student's current value."""

    def initializer(shape: Any, dtype: Any = None) -> Tensor:
        return ops.copy(ops.cast(_backend.read_stored_value(variable), dtype))

    return initializer


def _takes_training(layer: keras.layers.Layer) -> bool:
    return bool(getattr(layer, "_call_has_training_arg", True))
