"""Self-supervised MoCo v2 on scikit-learn's handwritten digits.

The query encoder learns by contrasting two augmented views (random shifts of
up to 2 pixels, Gaussian noise) of each 8x8 digit: the key encoder is
`keras_stateful.layers.AveragedModel` of the query encoder (momentum 0.99,
updated in the training step), the negatives are the keys of earlier batches
in a `keras_stateful.layers.MemoryQueue`. No label is used in training.

The features are judged by the test accuracy of a k-nearest-neighbour
classifier (k=5, cosine) fitted on the training features, on the clean test
digits and on test digits shifted and noised like the training views, against
the same encoder at random initialisation and against the same encoder trained
with the labels (softmax, on augmented digits). It also writes a 2-D PCA plot
of the test features.

    KERAS_BACKEND=jax python examples/moco_digits.py [--epochs 60] [--out out/]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import numpy as np
from keras import ops
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier

from keras_stateful.layers import AveragedModel, MemoryQueue

FEATURES = 64


def make_encoder(seed: int) -> keras.Sequential:
    """The backbone (features for kNN) followed by MoCo v2's MLP head."""
    init = keras.initializers.GlorotUniform
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, "relu", kernel_initializer=init(seed)),
            keras.layers.Dense(FEATURES, "relu", kernel_initializer=init(seed + 1)),
            keras.layers.Dense(128, "relu", kernel_initializer=init(seed + 2)),
            keras.layers.Dense(32, kernel_initializer=init(seed + 3)),
        ],
        name="encoder",
    )


def backbone_features(encoder: keras.Sequential, x: np.ndarray) -> np.ndarray:
    backbone = keras.Sequential(encoder.layers[:2])
    return np.asarray(backbone.predict(x, batch_size=512, verbose=0))


@keras.saving.register_keras_serializable(package="moco_digits")
class ContrastiveLogits(keras.layers.Layer):
    """MoCo's logits: `[q.k, q.negatives] / T`, the positive in column 0."""

    def __init__(self, temperature: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature

    def call(self, queries, keys, negatives, valid):
        q = ops.normalize(queries, axis=-1)
        k = ops.normalize(keys, axis=-1)
        positive = ops.sum(q * k, axis=-1, keepdims=True)
        negative = ops.where(valid, ops.matmul(q, ops.transpose(negatives)), -1e4)
        return ops.concatenate([positive, negative], axis=1) / self.temperature

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def build_moco(encoder: keras.Sequential, queue_size: int) -> keras.Model:
    view_q, view_k = (
        keras.Input((64,), name="view_q"),
        keras.Input((64,), name="view_k"),
    )
    key_encoder = AveragedModel(
        encoder, decay=0.99, training_mode=True, name="key_encoder"
    )
    keys = keras.layers.UnitNormalization()(key_encoder(view_k))
    negatives, valid = MemoryQueue(queue_size, return_mask=True, name="queue")(keys)
    logits = ContrastiveLogits(0.2)(encoder(view_q), keys, negatives, valid)
    model = keras.Model([view_q, view_k], logits)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random shifts of up to 2 pixels (zeros come in) and Gaussian noise."""
    images = x.reshape(-1, 8, 8)
    shifted = np.zeros_like(images)
    dy, dx = rng.integers(-2, 3, size=(2, len(x)))
    for i, (a, b) in enumerate(zip(dy, dx, strict=True)):
        src = images[i, max(0, -a) : 8 - max(0, a), max(0, -b) : 8 - max(0, b)]
        shifted[i, max(0, a) : 8 - max(0, -a), max(0, b) : 8 - max(0, -b)] = src
    noisy = shifted + rng.normal(scale=0.1, size=shifted.shape)
    return noisy.reshape(-1, 64).astype("float32")


def train_moco(x_train, epochs, batch_size, queue_size, seed):
    rng = np.random.default_rng(seed)
    encoder = make_encoder(seed)
    model = build_moco(encoder, queue_size)
    steps = len(x_train) // batch_size * batch_size
    for _ in range(epochs):
        order = rng.permutation(len(x_train))[:steps]
        views = [augment(x_train[order], rng), augment(x_train[order], rng)]
        model.fit(
            views, np.zeros(steps, "int32"), batch_size=batch_size, epochs=1,
            shuffle=False, verbose=0,
        )  # fmt: skip
    return encoder, model


def train_supervised(x_train, y_train, epochs, batch_size, seed):
    rng = np.random.default_rng(seed)
    encoder = make_encoder(seed)
    model = keras.Sequential([*encoder.layers[:2], keras.layers.Dense(10)])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    for _ in range(epochs):
        model.fit(augment(x_train, rng), y_train, batch_size=batch_size, verbose=0)
    return encoder


def knn_accuracy(encoder, x_train, y_train, x_test, y_test) -> float:
    knn = KNeighborsClassifier(n_neighbors=5, metric="cosine")
    knn.fit(backbone_features(encoder, x_train), y_train)
    return float(knn.score(backbone_features(encoder, x_test), y_test))


def plot(features: np.ndarray, labels: np.ndarray, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = PCA(2, random_state=0).fit_transform(features)
    figure, axis = plt.subplots(figsize=(6, 5))
    scatter = axis.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=8)
    axis.legend(*scatter.legend_elements(), title="digit", fontsize=7, loc="best")
    axis.set_title("MoCo v2 features of the test digits (PCA), no labels in training")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--queue-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"))
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    digits = load_digits()
    x, y = (digits.data / 16.0).astype("float32"), digits.target
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    print(
        f"backend: {keras.backend.backend()}, {len(x_train)} train / {len(x_test)} test"
    )
    start = time.perf_counter()
    moco, model = train_moco(
        x_train, args.epochs, args.batch_size, args.queue_size, args.seed
    )
    seconds = time.perf_counter() - start
    key_encoder = model.get_layer("key_encoder")
    updates = int(ops.convert_to_numpy(key_encoder.num_updates))
    random_init = make_encoder(args.seed)
    supervised = train_supervised(x_train, y_train, 30, args.batch_size, args.seed)
    x_moved = augment(x_test, np.random.default_rng(args.seed + 1))
    encoders = {
        "random-init encoder": random_init,
        "MoCo v2 (no labels)": moco,
        "supervised encoder": supervised,
    }
    print(
        f"MoCo: {args.epochs} epochs in {seconds:.0f} s, key encoder updates: {updates}"
    )
    print("kNN (k=5, cosine) test accuracy of the backbone features:")
    print(f"  {'':22s} {'clean test':>10s} {'shifted + noisy test':>21s}")
    for name, encoder in encoders.items():
        clean = knn_accuracy(encoder, x_train, y_train, x_test, y_test)
        moved = knn_accuracy(encoder, x_train, y_train, x_moved, y_test)
        print(f"  {name:22s} {clean:10.3f} {moved:21.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "moco_digits.png"
    plot(backbone_features(moco, x_test), y_test, path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
