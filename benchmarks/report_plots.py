"""The PNG plots of benchmarks/REPORT.md, one function per benchmark.

Each takes `{backend: record}` (one benchmark's JSON records, as
`make_report.py` loads them) and the PNG path to write; a figure has one
column per backend. `draw` picks the function by benchmark name and writes
`<folder>/<benchmark>.png`. Needs only matplotlib (no backend, no Keras).

    report_plots.draw("memory_queue_scaling", records, report.parent / "plots")
"""

# Plot labels carry Unicode signs (÷, –): intended.
# ruff: noqa: RUF001, RUF002, RUF003

from __future__ import annotations

import functools
import pathlib
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NAMES = {"jax": "JAX", "tensorflow": "TensorFlow", "torch": "PyTorch"}
# The ratios of the update-overhead plot, each with its bar colour.
OVERHEAD_BARS = [
    ("frozen_copy_over_frozen", "tab:olive"),
    ("on_over_frozen", "tab:green"),
    ("on_over_no_update", "tab:purple"),
    ("on_over_without", "tab:gray"),
]


def figure(ncols: int, nrows: int = 1, height: float = 3.4):
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.6 * ncols, height * nrows), squeeze=False
    )
    return fig, axes


def save(fig, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_overhead(records: dict[str, dict], path: pathlib.Path) -> None:
    """Bars of the step-time ratios per layer: a row per model, the goal dashed."""
    models = [
        m
        for m in ("mlp", "cnn")
        if any(k.startswith(m + "/") for r in records.values() for k in r["ratios"])
    ]
    fig, axes = figure(len(records), nrows=len(models))
    for col, (backend, record) in enumerate(records.items()):
        for row, model in enumerate(models):
            _overhead_panel(axes[row][col], backend, record, model)
    axes[0][0].legend(fontsize=7)
    save(fig, path)


def _overhead_panel(ax, backend: str, record: dict, model: str) -> None:
    ratios = record["ratios"]
    keys = [k for k in ratios if k.startswith(model + "/")]
    if not keys:
        ax.set_visible(False)
        return
    _overhead_bars(ax, ratios, keys)
    goal = record["goals"]["on_over_frozen"]["max"]
    ax.axhline(goal, color="black", linestyle="--", linewidth=0.8)
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xticks(
        range(len(keys)), [k.split("/")[1] for k in keys], rotation=35, ha="right"
    )
    ax.set_title(f"{NAMES[backend]}, {model.upper()}")
    ax.set_ylabel("step-time ratio")
    tallest = max(
        ratios[k][name]["median"]
        for k in keys
        for name in ("on_over_frozen", "on_over_no_update")
    )
    ax.set_ylim(0.8, min(max(1.5, tallest + 0.15), 3.0))


def _overhead_bars(ax, ratios: dict, keys: list[str]) -> None:
    """A group of bars per layer: each ratio's median, its quartiles as error."""
    for offset, (name, color) in enumerate(OVERHEAD_BARS):
        if any(name not in ratios[k] for k in keys):
            continue
        values = [ratios[k][name] for k in keys]
        medians = [v["median"] for v in values]
        ax.bar(
            [i + 0.2 * (offset - 1.5) for i in range(len(keys))],
            medians,
            width=0.2,
            color=color,
            yerr=[
                [v["median"] - v.get("round_q25", v["median"]) for v in values],
                [v.get("round_q75", v["median"]) - v["median"] for v in values],
            ],
            capsize=2,
            label=name.replace("frozen_copy_over_frozen", "A/A control")
            .replace("_over_", " ÷ ")
            .replace("_", " "),
        )


def scaling(
    records: dict[str, dict], path: pathlib.Path, size_key: str, xlabel: str, title: str
) -> None:
    """Step time against size, log-log: a line per variant, its min–max shaded."""
    fig, axes = figure(len(records))
    for ax, (backend, record) in zip(axes[0], records.items(), strict=True):
        for variant, rows in _by_variant(record, size_key).items():
            x = [r[size_key] for r in rows]
            ax.plot(x, [1e3 * r["median_s"] for r in rows], marker="o", label=variant)
            ax.fill_between(
                x,
                [1e3 * r["min_s"] for r in rows],
                [1e3 * r["max_s"] for r in rows],
                alpha=0.15,
            )
        _log_axes(
            ax, xlabel, "step time, ms (median, min–max)", f"{NAMES[backend]}: {title}"
        )
    save(fig, path)


def center_loss_batches(records: dict[str, dict], path: pathlib.Path) -> None:
    """CenterLoss's step increment against the batch size, a line per K."""
    fig, axes = figure(len(records))
    for ax, (backend, record) in zip(axes[0], records.items(), strict=True):
        increments = record["increments"]
        for k in sorted({r["num_classes"] for r in increments}):
            rows = sorted(
                (r for r in increments if r["num_classes"] == k),
                key=lambda r: r["batch"],
            )
            x = [r["batch"] for r in rows]
            y = [max(1e3 * r["median_s"], 1e-3) for r in rows]
            ax.plot(x, y, marker="o", label=f"K = {k:,}")
        _log_axes(
            ax,
            "batch B",
            "increment, ms (median over rounds)",
            f"{NAMES[backend]}: CenterLoss increment",
            base=2,
        )
    save(fig, path)


def vector_quantizer(records: dict[str, dict], path: pathlib.Path) -> None:
    """Step time (top) and peak memory (bottom) against the number of codes."""
    fig, axes = figure(len(records), nrows=2)
    for col, (backend, record) in enumerate(records.items()):
        for variant, rows in _by_variant(record, "num_embeddings").items():
            x = [r["num_embeddings"] for r in rows]
            axes[0][col].plot(
                x, [1e3 * r["median_s"] for r in rows], marker="o", label=variant
            )
            axes[1][col].plot(
                x,
                [r["peak_memory_bytes"] / 2**20 for r in rows],
                marker="o",
                label=variant,
            )
        for row, label in enumerate(["step time, ms", "peak memory, MiB"]):
            title = f"{NAMES[backend]}: {label.split(',')[0]}"
            _log_axes(axes[row][col], "codes K", label, title, base=2)
    save(fig, path)


def native(records: dict[str, dict], path: pathlib.Path) -> None:
    """Bars of the training step (top) and the update alone (bottom) per variant."""
    fig, axes = figure(len(records), nrows=2)
    for col, (backend, record) in enumerate(records.items()):
        for row, part in enumerate(["step", "update"]):
            _native_panel(axes[row][col], backend, record, part)
    save(fig, path)


def _native_panel(ax, backend: str, record: dict, part: str) -> None:
    rows = [r for r in record["results"] if r["part"] == part]
    ax.bar(
        range(len(rows)),
        [1e3 * r["median_s"] for r in rows],
        yerr=[
            [1e3 * (r["median_s"] - _quartiles(r)[0]) for r in rows],
            [1e3 * (_quartiles(r)[1] - r["median_s"]) for r in rows],
        ],
        color=[
            "tab:green" if "moving_moments" in r["variant"] else "tab:gray"
            for r in rows
        ],
        capsize=2,
    )
    ax.set_xticks(
        range(len(rows)),
        [r["variant"] for r in rows],
        rotation=35,
        ha="right",
        fontsize=7,
    )
    ax.set_ylabel("ms (median; quartiles of rounds)")
    ax.set_title(
        f"{NAMES[backend]}: " + ("training step" if part == "step" else "update alone")
    )


def sync_batch_norm(records: dict[str, dict], path: pathlib.Path) -> None:
    """Bars of the training step per model and normalization layer."""
    fig, axes = figure(len(records))
    for col, (backend, record) in enumerate(records.items()):
        ax = axes[0][col]
        rows = record["results"]
        ax.bar(
            range(len(rows)),
            [1e3 * r["median_s"] for r in rows],
            yerr=[
                [1e3 * (r["median_s"] - _quartiles(r)[0]) for r in rows],
                [1e3 * (_quartiles(r)[1] - r["median_s"]) for r in rows],
            ],
            color=[
                "tab:green" if r["variant"] == "sync_batch_norm" else "tab:gray"
                for r in rows
            ],
            capsize=2,
        )
        ax.set_xticks(
            range(len(rows)),
            [f"{r['model']}: {r['variant']}" for r in rows],
            rotation=35,
            ha="right",
            fontsize=7,
        )
        ax.set_ylabel("ms (median; quartiles of rounds)")
        ax.set_title(f"{NAMES[backend]}: training step")
    save(fig, path)


def _log_axes(ax, xlabel: str, ylabel: str, title: str, base: int = 10) -> None:
    """Log-log axes with their labels, title and legend."""
    ax.set_xscale("log", base=base)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def _by_variant(record: dict, size_key: str) -> dict[str, list[dict]]:
    """{variant: its result rows by increasing size}, variants in run order."""
    variants = dict.fromkeys(r["variant"] for r in record["results"])
    return {
        v: sorted(
            (r for r in record["results"] if r["variant"] == v),
            key=lambda r: r[size_key],
        )
        for v in variants
    }


def _quartiles(row: dict) -> tuple[float, float]:
    """Quartiles of a variant's per-round medians (min-max without rounds).

    Clipped to include the median (the median of all steps need not lie
    between the quartiles of the round medians).
    """
    rounds = row.get("round_medians_s") or []
    if len(rounds) < 4:
        return row["min_s"], row["max_s"]
    q = statistics.quantiles(rounds, n=4)
    return min(q[0], row["median_s"]), max(q[2], row["median_s"])


def averaged_model(records: dict[str, dict], path: pathlib.Path) -> None:
    """Bars of the step time per variant, a panel per backend."""
    fig, axes = figure(len(records))
    for col, (backend, record) in enumerate(records.items()):
        ax = axes[0][col]
        rows = record["results"]
        ax.bar(range(len(rows)), [1e3 * r["median_s"] for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["variant"] for r in rows], rotation=30, ha="right")
        ax.set_ylabel("ms per step")
        ax.set_title(f"{NAMES[backend]}: AveragedModel")
    save(fig, path)


DRAWERS = {
    "update_overhead": update_overhead,
    "center_loss_scaling": functools.partial(
        scaling, size_key="num_classes", xlabel="classes K", title="CenterLoss step"
    ),
    "center_loss_batch_sweep": center_loss_batches,
    "memory_queue_scaling": functools.partial(
        scaling, size_key="size", xlabel="queue size", title="enqueue step"
    ),
    "vector_quantizer_scaling": vector_quantizer,
    "native_comparison": native,
    "averaged_model": averaged_model,
    "sync_batch_norm_overhead": sync_batch_norm,
}


def draw(
    benchmark: str, records: dict[str, dict], folder: pathlib.Path
) -> pathlib.Path:
    """Draws `benchmark`'s plot into `folder/<benchmark>.png`; returns that path."""
    path = folder / f"{benchmark}.png"
    DRAWERS[benchmark](records, path)
    return path
