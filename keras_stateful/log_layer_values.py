"""`LogLayerValues`: the values stateful layers report, in the `fit` logs."""

from __future__ import annotations

from typing import Any

import keras

from keras_stateful.stateful_layer import find_stateful_layers


class LogLayerValues(keras.callbacks.Callback):
    """Adds the values that stateful layers report to the `fit` logs.

    Layers report values with `StatefulLayer.log_value()`: `CenterLoss` its
    weighted loss under its name (`center_loss`), for instance. This callback
    averages them over each epoch (weighted by batch size, as Keras averages
    `loss`) and puts them in the logs that the progress bar, `History` and
    later callbacks see: `center_loss` for training and `val_center_loss` for
    validation. In a plain `evaluate(..., callbacks=[callback])` the progress
    bar shows them and `callback.evaluation_values` holds them (Keras hands
    callbacks a copy of the logs, so they are not in the returned dict).

    It exists because Keras 3 on JAX cannot update a layer-owned
    `keras.metrics.Metric` during the forward pass of `fit`
    (keras-team/keras#21639); the running means live in the layers'
    non-trainable weights instead, which every backend carries through `fit`.
    A key that Keras already writes is never overwritten.

    Args:
        every_batch: Whether to add the running values after every batch, as
            the progress bar shows `loss`, and not only at the end of each
            epoch and evaluation. On JAX each read attaches the model state
            to the model (a host sync), so set it to `False` for the fastest
            runs. Defaults to `True`.

    Example:

    ```python
    history = model.fit(
        x, y, epochs=3, validation_split=0.2,
        callbacks=[keras_stateful.LogLayerValues()],
    )
    history.history["center_loss"], history.history["val_center_loss"]
    ```
    """

    def __init__(self, every_batch: bool = True) -> None:
        super().__init__()
        self.every_batch = bool(every_batch)
        self._in_fit = False
        self._training_values: dict[str, float] | None = None
        self.evaluation_values: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for layer in find_stateful_layers(self.model):
            values.update(layer.logged_values())
        return values

    def _reset(self) -> None:
        for layer in find_stateful_layers(self.model):
            layer.reset_logged_values()

    @staticmethod
    def _add(logs: dict[str, Any] | None, values: dict[str, float]) -> None:
        if logs is not None:
            for key, value in values.items():
                logs.setdefault(key, value)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._in_fit = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._in_fit = False

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._training_values = None
        self.evaluation_values = {}
        self._reset()

    def on_train_batch_end(
        self, batch: int, logs: dict[str, Any] | None = None
    ) -> None:
        if self.every_batch:
            self._add(logs, self._read())

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._in_fit:
            # Validation reuses the layers' sums: keep the epoch's first.
            self._training_values = self._read()
        self._reset()

    def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.every_batch:
            self._add(logs, self._read())

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        self.evaluation_values = self._read()
        self._add(logs, self.evaluation_values)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._training_values is None:
            self._add(logs, self._read())
            return
        self._add(logs, self._training_values)
        self._add(logs, {f"val_{k}": v for k, v in self.evaluation_values.items()})
