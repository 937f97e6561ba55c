"""Softmax vs softmax + CenterLoss on scikit-learn's handwritten digits.

Trains the same small network with a 2-D feature layer twice and prints, for
each run, the test accuracy and how compact the classes are: the mean distance
of a test feature to its class mean divided by the mean distance between class
means (lower is tighter). It also writes a figure in the style of Wen et al.
(2016): the 2-D test features coloured by class, with the class centers.

    KERAS_BACKEND=jax python examples/center_loss_digits.py [--epochs 30] [--out out/]
"""

from __future__ import annotations

import argparse
import os
import pathlib

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_stateful
from keras_stateful.layers import CenterLoss

NUM_CLASSES = 10


def build_model(with_center_loss: bool, loss_weight: float) -> keras.Model:
    pixels = keras.Input((64,), name="pixels")
    labels = keras.Input((), dtype="int32", name="labels")
    hidden = keras.layers.Dense(128, activation="relu")(pixels)
    hidden = keras.layers.Dense(64, activation="relu")(hidden)
    features = keras.layers.Dense(2, name="features")(hidden)
    if with_center_loss:
        features = CenterLoss(
            NUM_CLASSES, alpha=0.5, loss_weight=loss_weight, name="center_loss"
        )([features, labels])
    logits = keras.layers.Dense(NUM_CLASSES, name="logits")(features)
    model = keras.Model([pixels, labels], logits)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def compactness(features: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean intra-class distance / mean inter-center distance, and the centers."""
    centers = np.stack([features[labels == k].mean(0) for k in range(NUM_CLASSES)])
    intra = np.linalg.norm(features - centers[labels], axis=1).mean()
    pairwise = np.linalg.norm(centers[:, None] - centers[None], axis=-1)
    inter = pairwise[np.triu_indices(NUM_CLASSES, 1)].mean()
    return float(intra / inter), centers


def run(name, with_center_loss, data, epochs, loss_weight):
    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(0)
    model = build_model(with_center_loss, loss_weight)
    print(f"\n== {name}")
    model.fit(
        [x_train, y_train],
        y_train,
        batch_size=64,
        epochs=epochs,
        verbose=2,
        callbacks=[keras_stateful.LogLayerValues()],  # shows `center_loss`
    )
    _, accuracy = model.evaluate([x_test, y_test], y_test, verbose=0)
    feature_model = keras.Model(model.inputs, model.get_layer("features").output)
    features = feature_model.predict([x_test, y_test], verbose=0)
    ratio, centers = compactness(features, y_test)
    if with_center_loss:
        centers = np.asarray(
            keras.ops.convert_to_numpy(model.get_layer("center_loss").centers)
        )
    return {
        "name": name,
        "accuracy": accuracy,
        "ratio": ratio,
        "features": features,
        "centers": centers,
    }


def plot(results, labels, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 5.5))
    colours = plt.get_cmap("tab10")
    for axis, result in zip(axes, results, strict=True):
        for k in range(NUM_CLASSES):
            points = result["features"][labels == k]
            axis.scatter(
                points[:, 0], points[:, 1], s=6, color=colours(k), label=str(k)
            )
        axis.scatter(
            *result["centers"].T, marker="x", s=80, color="black", label="centers"
        )
        axis.set_title(
            f"{result['name']}\naccuracy {result['accuracy']:.3f}, "
            f"intra/inter {result['ratio']:.3f}"
        )
        axis.set_xlabel("feature 1")
        axis.set_ylabel("feature 2")
    axes[-1].legend(loc="center left", bbox_to_anchor=(1, 0.5), markerscale=2)
    figure.suptitle(f"2-D test features, digits ({keras.backend.backend()} backend)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--loss-weight", type=float, default=0.1)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"))
    args = parser.parse_args()

    digits = load_digits()
    data = train_test_split(
        (digits.data / 16.0).astype("float32"),
        digits.target.astype("int32"),
        test_size=0.25,
        random_state=0,
        stratify=digits.target,
    )
    results = [
        run("softmax only", False, data, args.epochs, args.loss_weight),
        run(
            f"softmax + CenterLoss (weight {args.loss_weight})",
            True,
            data,
            args.epochs,
            args.loss_weight,
        ),
    ]
    print(f"\nbackend: {keras.backend.backend()}")
    print(f"{'run':<38} {'test accuracy':>13} {'intra/inter distance':>21}")
    for result in results:
        print(
            f"{result['name']:<38} {result['accuracy']:>13.3f} {result['ratio']:>21.3f}"
        )
    path = args.out / "center_loss_digits.png"
    plot(results, data[3], path)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
