"""`CenterLoss`: class centers kept by the Wen et al. (2016) rule, and their loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
from keras import ops

from keras_stateful import _backend, distributed
from keras_stateful.layers import _checks
from keras_stateful.layers._groups import Groups, group_by_id
from keras_stateful.stateful_layer import StatefulLayer, next_count
from keras_stateful.types import Tensor


@dataclass
class _Update:
    """One step's samples for the center update.

    `x`, `weight` (1 for a valid label), `safe_ids` and `skipped` are over
    all replicas' samples. Without accumulation, `groups` holds them grouped
    by class and `run_centers` each group's center before the update.
    `local`: nothing was gathered from other replicas (the samples are this
    call's batch, in order).
    """

    x: Tensor
    weight: Tensor
    safe_ids: Tensor
    skipped: Tensor
    local: bool
    groups: Groups | None = None
    run_centers: Tensor | None = None


@keras.saving.register_keras_serializable(package="keras_stateful")
class CenterLoss(StatefulLayer):
    """Center loss: pulls features towards per-class centers kept as state.

    Called on `[features, labels]`, it returns `features` unchanged and adds
    `loss_weight * mean_i 0.5 * ||x_i - c_{y_i}||^2` to the model's losses,
    computed with the centers before this step's update (gradients reach the
    features, never the centers). It is part of `loss` in the `fit` logs, and
    with the `keras_stateful.LogLayerValues()` callback it is also logged on
    its own under the layer's name (`center_loss`, `val_center_loss`).

    In training, with `n_j` the number of samples of class `j` in the batch
    (Wen et al., Eq. 4, as in the Keras-2 example):

    - `delta_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)`
    - `c_j = c_j - alpha * delta_j`

    Classes absent from the batch do not move. Only the rows of the classes
    in the batch are computed and written (a sort of the batch by class,
    sums over runs of equal ids and a row scatter), so a step costs
    O(B log B + B * D) for a batch of B, the same for 10 or 100,000 classes.

    An empty batch (`B = 0`) adds a zero loss and updates nothing.

    With `accumulation_steps=N` the centers move once per window of `N`
    micro-batches, by Eq. 4 over the window's samples; this keeps `(K,)` and
    `(K, D)` accumulators and computes every row each micro-batch (O(K * D)).

    Labels are integer class ids of shape `(B,)` or `(B, 1)`, or one-hot
    `(B, num_classes)`. An id outside `[0, num_classes)` raises a
    `ValueError` when the call runs eagerly (this includes PyTorch's `fit`,
    which runs eagerly unless `jit_compile=True`); in compiled code (a traced
    `fit` step on JAX or TensorFlow) such samples are left out of the loss
    and the update, and counted in the `out_of_range_labels` state.

    **`trainable=False`** stops the updates (recompile after changing it);
    `freeze_state()` stops them while training goes on.

    Args:
        num_classes: Number of classes `K`.
        alpha: Center learning rate `alpha` of the paper. Defaults to `0.5`.
        loss_weight: Weight `lambda` of the center loss. Defaults to `1.0`.
        centers_initializer: Initializer of the `(K, D)` centers. Defaults
            to `"zeros"`, as in the paper.
        **kwargs: `StatefulLayer` arguments (`guard_non_finite`, `name`, ...).

    Call arguments:
        inputs: `[features, labels]`; features of shape `(B, D)`.
        training: Whether the call is in training mode (updates the centers).

    Example:

    ```python
    hidden, labels = keras.Input((16,)), keras.Input((), dtype="int32")
    features = keras.layers.Dense(2)(hidden)
    features = keras_stateful.layers.CenterLoss(10, alpha=0.5, loss_weight=0.1)(
        [features, labels]
    )
    ```

    Reference:
        - [Wen et al., 2016](https://ydwen.github.io/papers/WenECCV16.pdf)
    """

    def __init__(
        self,
        num_classes: int,
        alpha: float = 0.5,
        *,
        loss_weight: float = 1.0,
        centers_initializer: Any = "zeros",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = _checks.integer(
            num_classes,
            "num_classes",
            layer="CenterLoss",
            example="CenterLoss(10)",
            minimum=1,
            meaning="the number of classes K",
        )
        self.alpha = float(alpha)
        self.loss_weight = float(loss_weight)
        self.centers_initializer = keras.initializers.get(centers_initializer)
        self.centers = None
        self.out_of_range_labels = None
        self._feature_dim = 0
        self.add_logged_value(self.name)

    def build(self, input_shape: Any) -> None:
        features_shape, _ = self._split_shapes(input_shape)
        if len(features_shape) != 2 or features_shape[-1] is None:
            raise ValueError(
                f"Layer '{self.name}': features must have shape (batch, dim) "
                f"with a known dim; received {tuple(features_shape)}. Flatten "
                "them first, e.g. `keras.layers.Flatten()(x)`."
            )
        self._feature_dim = int(features_shape[-1])
        self.centers = self.add_state(
            "centers",
            (self.num_classes, int(features_shape[-1])),
            initializer=self.centers_initializer,
        )
        self.out_of_range_labels = self.add_state(
            "out_of_range_labels", (), dtype="int32"
        )
        # With accumulation_steps > 1 only: n_j and sum_i x_i of the window.
        self.add_statistic("counts", (self.num_classes,))
        self.add_statistic("sums", (self.num_classes, self._feature_dim))

    def call(self, inputs: Any, training: bool | Tensor | None = None) -> Tensor:
        features, labels = self._split_inputs(inputs)
        dim = self._feature_dim
        if len(features.shape) != 2 or features.shape[-1] not in (None, dim):
            raise ValueError(
                f"Layer '{self.name}': features must have shape (batch, {dim}), "
                f"as when the centers were built; received shape "
                f"{tuple(features.shape)}. Pass the same feature layer's output "
                "(flattened) on every call."
            )
        x = ops.cast(features, "float32")
        ids = self._class_ids(labels)
        if x.shape[0] == 0:
            # An empty batch: nothing to pull and nothing to update.
            self.add_loss(ops.sum(x) * 0.0)
            return features
        valid = ops.logical_and(ids >= 0, ids < self.num_classes)
        safe_ids = ops.where(valid, ids, 0)
        weight = ops.cast(valid, "float32")
        update = None
        if self.may_update(training):
            update = self._batch_for_update(x, ids, valid)

        # The loss, with the centers before the update. When the update reads
        # the rows of this batch's classes, the loss takes its rows from them:
        # the centers are then read once, before they are written (on JAX a
        # second read could make XLA copy all the centers to write them).
        if update is not None and update.local and update.groups is not None:
            own_centers = ops.take(update.run_centers, update.groups.sample_run, axis=0)
        else:
            own_centers = _backend.read_rows(self.centers, safe_ids)
        distance = 0.5 * ops.sum(ops.square(x - own_centers), axis=-1)
        loss = ops.sum(weight * distance) / ops.maximum(ops.sum(weight), 1.0)
        loss = self.loss_weight * loss
        self.add_loss(loss)
        self.log_value(self.name, loss, count=ops.shape(x)[0])

        if update is not None:
            self._update_centers(update, training)
        return features

    def compute_output_shape(self, input_shape: Any) -> Any:
        return self._split_shapes(input_shape)[0]

    def _batch_for_update(self, x: Tensor, ids: Tensor, valid: Tensor) -> _Update:
        """The samples the update uses (all replicas'), grouped by class."""
        # In a data-parallel run the update uses every replica's batch (all
        # replicas then commit the same rows); on one device, this batch.
        x, present = distributed.cross_replica_gather(x)
        skipped = ops.sum(1 - ops.cast(valid, "int32"))
        if present is not None:
            ids = distributed.cross_replica_gather(ids)[0]
            labelled = distributed.cross_replica_gather(valid)[0]
            valid = ops.logical_and(present, labelled)
            skipped = ops.sum(
                ops.cast(ops.logical_and(present, ops.logical_not(labelled)), "int32")
            )
        update = _Update(
            x=ops.stop_gradient(x),
            weight=ops.cast(valid, "float32"),
            safe_ids=ops.where(valid, ids, 0),
            skipped=skipped,
            local=present is None,
        )
        if self.accumulation_steps > 1:
            return update

        # The samples grouped by class (`_groups`): one row per class in the
        # batch is read, computed and written, never a (B, D) copy of the
        # features. O(B log B + B * D).
        update.groups = group_by_id(ids, valid, self.num_classes)
        update.run_centers = _backend.read_rows(self.centers, update.groups.ids)
        return update

    def _update_centers(self, update: _Update, training: bool | Tensor) -> None:
        """Eq. 4 on the rows of the classes in the batch (all replicas')."""
        groups, centers = update.groups, update.run_centers
        if groups is None or centers is None:
            self._update_all_centers(
                update.x, update.safe_ids, update.weight, update.skipped, training
            )
            return
        # n_j and sum_i x_i per class; the invalid samples' group sums to 0.
        count = groups.sums(update.weight)[:, None]
        delta = (count * centers - groups.sums(update.x)) / (1.0 + count)
        new_rows = groups.first_valid_where_not(centers - self.alpha * delta)
        self.commit_state(
            (self.centers, groups.rows_at(), new_rows),
            (
                self.out_of_range_labels,
                next_count(self.out_of_range_labels, update.skipped),
            ),
            training=training,
        )

    def _update_all_centers(
        self,
        x: Tensor,
        safe_ids: Tensor,
        weight: Tensor,
        skipped: Tensor,
        training: bool | Tensor,
    ) -> None:
        """Eq. 4 once per accumulation window, from the window's n_j and sums.

        The centers do not move within a window, so this equals one update
        with the window's micro-batches concatenated. The classes the window
        touched are not known in advance: every row is computed (O(K * D) per
        micro-batch), and rows with `n_j = 0` keep their value.
        """
        classes = self.num_classes
        window = self.accumulate(
            {
                "counts": ops.segment_sum(weight, safe_ids, num_segments=classes),
                "sums": ops.segment_sum(
                    x * weight[:, None], safe_ids, num_segments=classes
                ),
            },
            training=training,
        )
        centers = _backend.read_value(self.centers)
        counts = window["counts"][:, None]
        delta = (counts * centers - window["sums"]) / (1.0 + counts)
        self.commit_state(
            (self.centers, centers - self.alpha * delta),
            (self.out_of_range_labels, next_count(self.out_of_range_labels, skipped)),
            training=training,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "alpha": self.alpha,
            "loss_weight": self.loss_weight,
            "centers_initializer": keras.initializers.serialize(
                self.centers_initializer
            ),
        }

    # ---------------------------------------------------------------- inputs

    def _split_shapes(self, input_shape: Any) -> tuple[Any, Any]:
        if not (isinstance(input_shape, (list, tuple)) and len(input_shape) == 2):
            raise ValueError(self._inputs_help(f"input shape {input_shape}"))
        first = input_shape[0]
        if first is None or isinstance(first, int):
            raise ValueError(self._inputs_help(f"one tensor of shape {input_shape}"))
        return tuple(input_shape[0]), tuple(input_shape[1])

    def _split_inputs(self, inputs: Any) -> tuple[Tensor, Tensor]:
        if not (isinstance(inputs, (list, tuple)) and len(inputs) == 2):
            raise ValueError(self._inputs_help(f"{type(inputs).__name__}"))
        return inputs[0], inputs[1]

    def _inputs_help(self, received: str) -> str:
        return (
            f"Layer '{self.name}' is called on [features, labels]; received "
            f"{received}. Write `CenterLoss({self.num_classes})([features, "
            "labels])` with labels as a second model input."
        )

    def _class_ids(self, labels: Tensor) -> Tensor:
        labels = ops.convert_to_tensor(labels)
        shape = tuple(labels.shape)
        one_hot = (
            len(shape) == 2 and shape[-1] == self.num_classes and self.num_classes > 1
        )
        if one_hot:
            return ops.cast(ops.argmax(labels, axis=-1), "int32")
        if not (len(shape) == 1 or (len(shape) == 2 and shape[-1] == 1)):
            raise ValueError(
                f"Layer '{self.name}': labels must be class ids of shape (B,) "
                f"or (B, 1), or one-hot (B, {self.num_classes}); received shape "
                f"{shape}."
            )
        ids = _checks.integer_ids(
            labels,
            self.name,
            "class-id labels",
            'Declare the labels input as `keras.Input((), dtype="int32")` or '
            'cast them with `ops.cast(labels, "int32")`.',
        )
        _checks.ids_in_range(
            ids,
            self.num_classes,
            self.name,
            "labels must be class ids",
            "Raise num_classes or fix the labels.",
        )
        return ids
