"""`calibrate`: recompute the state of a model's stateful layers from data."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import keras
import numpy as np

from keras_stateful.stateful_layer import StatefulLayer, find_stateful_layers


def calibrate(
    model: keras.layers.Layer,
    data: Any,
    *,
    batch_size: int = 32,
    steps: int | None = None,
) -> list[StatefulLayer]:
    """Reset every stateful layer of `model` and recompute its state from `data`.

    The Keras counterpart of PyTorch's `torch.optim.swa_utils.update_bn`: after
    weight averaging, pruning, or loading new weights, the moving statistics
    no longer describe the activations the weights produce. `calibrate`
    resets the state of every `StatefulLayer` in the model (`reset_state()`),
    then runs the data through the model with `training=True`, eagerly, so the
    layers update their state; trainable weights, the optimizer and the
    compiled functions are not touched. Layers that are frozen or have
    `trainable=False` are updated too (calibration is an explicit request) and
    get their settings back afterwards. Each layer's `calibration()` context
    is in force meanwhile: `MovingMoments` keeps the plain average over the
    calibration batches, as `update_bn` does with `momentum=None`.

    Other layers also see `training=True`: dropout is active, as in
    `update_bn`, and Keras's own `BatchNormalization` updates (but is not
    reset).

    Args:
        model: A Keras model (or layer) holding stateful layers.
        data: A NumPy array or a list of arrays (the model's inputs), split
            into batches of `batch_size`; or an iterable of batches (e.g. a
            `tf.data.Dataset` or a `torch` `DataLoader`) whose items are the
            inputs or `(inputs, targets[, sample_weights])` tuples.
        batch_size: Batch size for array data. Defaults to `32`.
        steps: Stop after this many batches. Defaults to `None` (all data).

    Returns:
        The stateful layers that were recalibrated.

    Example:

    ```python
    model.set_weights(averaged_weights)  # e.g. after stochastic weight averaging
    keras_stateful.calibrate(model, x_train, batch_size=256)
    model.evaluate(x_test, y_test)
    ```
    """
    layers = find_stateful_layers(model)
    with contextlib.ExitStack() as stack:
        for layer in layers:
            trainable, frozen = layer.trainable, layer.state_frozen
            layer.trainable = True
            layer.unfreeze_state()
            stack.callback(_restore, layer, trainable, frozen)
            stack.enter_context(layer.calibration())
        for layer in layers:
            layer.reset_state()
        for step, batch in enumerate(_batches(data, batch_size)):
            if steps is not None and step >= steps:
                break
            model(batch, training=True)
    return layers


def _restore(layer: StatefulLayer, trainable: bool, frozen: bool) -> None:
    layer.trainable = trainable
    if frozen:
        layer.freeze_state()


def _batches(data: Any, batch_size: int) -> Iterable[Any]:
    """The model inputs of each batch of `data`."""
    if isinstance(data, np.ndarray) or (
        isinstance(data, list) and data and isinstance(data[0], np.ndarray)
    ):
        arrays = data if isinstance(data, list) else [data]
        total = len(arrays[0])
        for start in range(0, total, batch_size):
            batch = [a[start : start + batch_size] for a in arrays]
            yield batch if isinstance(data, list) else batch[0]
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            "calibrate: `data` must be a NumPy array, a list of arrays, or an "
            f"iterable of batches; received {type(data).__name__}. Pass e.g. "
            "`calibrate(model, x_train)` or a `tf.data.Dataset`."
        )
    for item in data:
        if isinstance(item, tuple):
            item, _, _ = keras.utils.unpack_x_y_sample_weight(item)
        yield item
