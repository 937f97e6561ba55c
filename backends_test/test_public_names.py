"""The docs, the README and the examples use only public names, and each exists.

A user's layer must not depend on a private module: every `keras_stateful...`
name they mention resolves through public modules (no component starting
with `_`).
"""

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         *sorted((ROOT / "examples").glob("*.py"))]  # fmt: skip
DOTTED = re.compile(r"\bkeras_stateful(?:\.\w+)+")
FROM_IMPORT = re.compile(r"from (keras_stateful[\w.]*) import (\([\w,\s]+\)|[\w, ]+)")


def names_in(text):
    names = set(DOTTED.findall(text))
    for module, imported in FROM_IMPORT.findall(text):
        parts = imported.strip("()").split(",")
        names.update(f"{module}.{n.strip()}" for n in parts if n.strip())
    return names


def resolve(name):
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


@pytest.mark.parametrize("path", TEXTS, ids=lambda p: p.name)
def test_every_name_used_is_public_and_exists(path):
    names = names_in(path.read_text())
    private = sorted(n for n in names if any(p.startswith("_") for p in n.split(".")))
    assert not private, f"{path.name} uses private names: {private}"
    for name in sorted(names):
        if name.endswith((".py", ".md")):
            continue
        resolve(name)


def test_the_collectives_are_public():
    from keras_stateful.distributed import (  # noqa: F401
        cross_replica_gather,
        cross_replica_max,
        cross_replica_mean,
        cross_replica_min,
        cross_replica_sum,
    )
