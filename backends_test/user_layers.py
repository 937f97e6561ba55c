"""Layers written the way a user of keras_stateful would write them.

They exercise the base class from the outside: reading state in
differentiable computation, a trainable weight beside state, the Keras-2
`add_update` spelling.
"""

import keras
from keras import ops

import keras_stateful


@keras.saving.register_keras_serializable(package="backends_test")
class ScaledByRunningMean(keras_stateful.StatefulLayer):
    """Outputs `inputs * kernel * running_mean`, then updates the running mean.

    The state is read in a differentiable product and committed in the same
    call: the torch trap "modified by an inplace operation".
    """

    def __init__(self, momentum=0.5, **kwargs):
        super().__init__(**kwargs)
        self.momentum = momentum

    def build(self, input_shape):
        dim = input_shape[-1]
        self.kernel = self.add_weight(name="kernel", shape=(dim,), initializer="ones")
        self.running_mean = self.add_state("running_mean", (dim,), initializer="ones")

    def call(self, inputs, training=None):
        outputs = inputs * self.kernel * ops.cast(self.running_mean, inputs.dtype)
        batch_mean = ops.mean(ops.cast(inputs, "float32"), axis=0)
        new_mean = self.momentum * self.running_mean + (1 - self.momentum) * batch_mean
        self.commit_state((self.running_mean, new_mean), training=training)
        return outputs

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum}


@keras.saving.register_keras_serializable(package="backends_test")
class Keras2StyleCenters(keras_stateful.StatefulLayer):
    """A Keras-2 center-loss update, ported with `add_update` unchanged.

    `call` has no `training` argument, as in the Keras-2 original; the update
    runs only in training all the same.
    """

    def __init__(self, num_classes=3, alpha=0.5, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.alpha = alpha

    def build(self, input_shape):
        feature_shape, _ = input_shape
        self.centers = self.add_state(
            "centers", (self.num_classes, feature_shape[-1]), initializer="zeros"
        )

    def call(self, inputs):
        features, labels = inputs
        features = ops.cast(features, "float32")
        labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
        one_hot = ops.one_hot(labels, self.num_classes)
        delta = ops.matmul(
            ops.transpose(one_hot), ops.matmul(one_hot, self.centers) - features
        )
        delta = delta / (1 + ops.expand_dims(ops.sum(one_hot, axis=0), 1))
        self.add_update((self.centers, self.centers - self.alpha * delta), features)
        return features

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = {"num_classes": self.num_classes, "alpha": self.alpha}
        return {**super().get_config(), **config}
