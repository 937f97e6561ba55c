"""Write benchmarks/REPORT.md and its plots from the JSON results.

Reads every `<benchmark>_<backend>.json` in the results folder, and writes
the report (a headline table of the goals, then one section per question
with a table per backend, the machine and versions beside the figures, the
plots, and the hand-written analysis in benchmarks/notes/<benchmark>.md when
there is one) and PNG plots in `plots/` beside the report.

    python benchmarks/make_report.py [--results DIR] [--report FILE]

Needs only matplotlib (no backend, no Keras).
"""

# The report is Markdown with Unicode signs (×, ÷, –, ≤): intended.
# ruff: noqa: RUF001, RUF002, RUF003

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = pathlib.Path(__file__).resolve().parent
BACKENDS = ["jax", "tensorflow", "torch"]
NAMES = {"jax": "JAX", "tensorflow": "TensorFlow", "torch": "PyTorch"}
BENCHMARKS = {
    "update_overhead": "1. Overhead of the update",
    "center_loss_scaling": "2. CenterLoss scaling",
    "memory_queue_scaling": "3. MemoryQueue scaling",
    "vector_quantizer_scaling": "4. VectorQuantizerEMA: time and peak memory",
    "native_comparison": "5. Against Keras's BatchNormalization and native code",
}
COLORS = {"jax": "tab:blue", "tensorflow": "tab:orange", "torch": "tab:red"}


# ---------------------------------------------------------------- helpers


def load(results: pathlib.Path) -> dict[str, dict[str, dict]]:
    """{benchmark: {backend: record}} from every JSON file in `results`."""
    found: dict[str, dict[str, dict]] = {}
    for path in sorted(results.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            print(f"skipped {path}: {error}", file=sys.stderr)
            continue
        benchmark, backend = record.get("benchmark"), record.get("backend")
        if benchmark in BENCHMARKS and backend in BACKENDS:
            found.setdefault(benchmark, {})[backend] = record
    return found


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    value = 1e3 * seconds
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def spread(row: dict) -> str:
    """`median (min–max)` in ms."""
    return f"{ms(row['median_s'])} ({ms(row['min_s'])}–{ms(row['max_s'])})"


def times(ratio: dict | float | None, digits: int = 2) -> str:
    """A ratio, with the range of its per-round values when known."""
    if ratio is None:
        return "–"
    if isinstance(ratio, dict):
        text = f"{ratio['median']:.{digits}f}×"
        if "round_q25" in ratio:
            low, high = ratio["round_q25"], ratio["round_q75"]
            text += f" ({low:.{digits}f}–{high:.{digits}f})"
        elif "round_min" in ratio:
            low, high = ratio["round_min"], ratio["round_max"]
            text += f" ({low:.{digits}f}–{high:.{digits}f}, min–max)"
        return text
    return f"{ratio:.{digits}f}×"


def verdict(met: bool | None) -> str:
    if met is None:
        return "–"
    return "met" if met else "**not met**"


def machine(record: dict) -> str:
    """One line: backend and versions, CPU, cores, threads, load, date."""
    versions = record.get("versions", {})
    backend = record["backend"]
    module = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}[backend]
    version = versions.get(module) or versions.get("tensorflow-cpu") or "?"
    threads = record.get("threads") or {}
    requested = threads.get("requested")
    load = record.get("load_average_start")
    parts = [
        f"{NAMES[backend]} {version}",
        f"Keras {versions.get('keras', record.get('keras', '?'))}",
        f"keras_stateful {versions.get('keras_stateful', '?')}",
        f"{record.get('cpu', record.get('machine', '?'))}",
        f"{record.get('cores', '?')} cores",
    ]
    if "threads" not in record:
        parts.append("threads not recorded")
    else:
        parts.append(
            f"{requested} intra-op thread(s)" if requested else "default threads"
        )
    if load:
        parts.append(f"load {load[0]:.1f} at start")
    parts.append(str(record.get("date", "?"))[:16].replace("T", " ") + " UTC")
    if record.get("commit"):
        parts.append(f"commit {record['commit']}")
    if record.get("keras_stateful_source_sha256"):
        parts.append(f"library source {record['keras_stateful_source_sha256']}")
    if record.get("quick"):
        parts.append("**quick run: sizes and steps cut, not representative**")
    return "_" + ", ".join(parts) + "_"


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


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def scaling_section(backend: str, record: dict, size_key: str, label: str) -> list[str]:
    """A backend's heading, machine line and table: one row per size, a
    column per variant (step time in ms, median and min–max)."""
    results = record["results"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    sizes = sorted({r[size_key] for r in results})
    by = {(r["variant"], r[size_key]): r for r in results}
    rows = [
        [f"{k:,}"] + [spread(by[v, k]) if (v, k) in by else "–" for v in variants]
        for k in sizes
    ]
    return [
        f"### {NAMES[backend]}",
        "",
        machine(record),
        "",
        f"Step: {record.get('step', '?')}; D = {record.get('D')}, "
        f"B = {record.get('B')}. Step time in ms, median (min–max).",
        "",
        *table([label, *variants], rows),
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


# ------------------------------------------------------------- questions


def update_overhead(records, plots):
    """Question 1: a table per backend, one plot; the headline figure."""
    lines, headline = [], {}
    for backend, record in records.items():
        goal = record.get("goal", {}).get("on_over_frozen_max", 1.05)
        by = {(r["model"], r["layer"], r["variant"]): r for r in record["results"]}
        rows = []
        worst = None
        for key, ratio in record["ratios"].items():
            model, layer = key.split("/")
            on_frozen = ratio["on_over_frozen"]
            control = ratio.get("frozen_copy_over_frozen")
            if worst is None or on_frozen["median"] > worst[1]:
                worst = (key, on_frozen["median"], control)
            rows.append(
                [
                    model.upper(),
                    layer,
                    ms(by[model, layer, "on"]["median_s"]),
                    ms(by[model, layer, "frozen"]["median_s"]),
                    ms(by[model, layer, "no_update"]["median_s"]),
                    ms(by[model, layer, "without"]["median_s"]),
                    times(on_frozen, 3),
                    verdict(on_frozen["median"] <= goal),
                    times(control, 3),
                    times(ratio["on_over_no_update"]),
                    times(ratio["on_over_without"]),
                ]
            )
        headline[backend] = (worst, goal)
        lines += [f"### {NAMES[backend]}", "", machine(record), ""]
        lines += [
            f"Step: {record.get('step', '?')}; batch {record.get('batch')}, "
            f"MLP width {record.get('mlp_width')}, "
            f"{record.get('rounds')} rounds × {record.get('steps_per_round')} "
            "step(s) per variant. Times: median step, ms. Ratios: median of the "
            "per-round ratios (their quartiles in brackets). The A/A column "
            "compares two separately built frozen models, the same program: "
            "its distance from 1 is the noise of this machine.",
            "",
        ]
        lines += table(
            [
                "model",
                "layer",
                "on",
                "frozen",
                "no update",
                "without",
                "on ÷ frozen",
                f"≤ {goal}",
                "A/A: frozen′ ÷ frozen",
                "on ÷ no update",
                "on ÷ without",
            ],
            rows,
        )
        lines.append("")
    if records:
        models = [
            m
            for m in ("mlp", "cnn")
            if any(k.startswith(m + "/") for r in records.values() for k in r["ratios"])
        ]
        fig, axes = figure(len(records), nrows=len(models))
        for col, (backend, record) in enumerate(records.items()):
            for row, model in enumerate(models):
                ax = axes[row][col]
                keys = [k for k in record["ratios"] if k.startswith(model + "/")]
                if not keys:
                    ax.set_visible(False)
                    continue
                labels = [k.split("/")[1] for k in keys]
                for offset, (name, color) in enumerate(
                    [
                        ("frozen_copy_over_frozen", "tab:olive"),
                        ("on_over_frozen", "tab:green"),
                        ("on_over_no_update", "tab:purple"),
                        ("on_over_without", "tab:gray"),
                    ]
                ):
                    if any(name not in record["ratios"][k] for k in keys):
                        continue
                    values = [record["ratios"][k][name] for k in keys]
                    medians = [v["median"] for v in values]
                    low = [
                        v["median"] - v.get("round_q25", v["median"]) for v in values
                    ]
                    high = [
                        v.get("round_q75", v["median"]) - v["median"] for v in values
                    ]
                    ax.bar(
                        [i + 0.2 * (offset - 1.5) for i in range(len(keys))],
                        medians,
                        width=0.2,
                        color=color,
                        yerr=[low, high],
                        capsize=2,
                        label=name.replace("frozen_copy_over_frozen", "A/A control")
                        .replace("_over_", " ÷ ")
                        .replace("_", " "),
                    )
                ax.axhline(1.05, color="black", linestyle="--", linewidth=0.8)
                ax.axhline(1.0, color="black", linewidth=0.5)
                ax.set_xticks(range(len(keys)), labels, rotation=35, ha="right")
                ax.set_title(f"{NAMES[backend]}, {model.upper()}")
                ax.set_ylabel("step-time ratio")
                tallest = max(
                    record["ratios"][k][name]["median"]
                    for k in keys
                    for name in ("on_over_frozen", "on_over_no_update")
                )
                ax.set_ylim(0.8, min(max(1.5, tallest + 0.15), 3.0))
        axes[0][0].legend(fontsize=7)
        save(fig, plots / "update_overhead.png")
        lines += ["![update overhead](plots/update_overhead.png)", ""]
    return lines, headline


def scaling_plot(records, plots, name, size_key, xlabel, title):
    fig, axes = figure(len(records))
    for ax, (backend, record) in zip(axes[0], records.items(), strict=True):
        variants = dict.fromkeys(r["variant"] for r in record["results"])
        for variant in variants:
            rows = sorted(
                (r for r in record["results"] if r["variant"] == variant),
                key=lambda r: r[size_key],
            )
            x = [r[size_key] for r in rows]
            ax.plot(x, [1e3 * r["median_s"] for r in rows], marker="o", label=variant)
            ax.fill_between(
                x,
                [1e3 * r["min_s"] for r in rows],
                [1e3 * r["max_s"] for r in rows],
                alpha=0.15,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("step time, ms (median, min–max)")
        ax.set_title(f"{NAMES[backend]}: {title}")
        ax.legend(fontsize=7)
    save(fig, plots / f"{name}.png")


def center_loss(records, plots):
    lines, headline = [], {}
    for backend, record in records.items():
        summary = record["summary"]
        growth_goal = summary.get("goal_ours_largest_over_smallest", 1.5)
        speed_goal = summary.get("goal_dense_over_ours_at_largest", 10.0)
        ratios = summary.get("ratios", {})
        growth = ratios.get("ours_largest_over_smallest")
        speedup = ratios.get("dense_over_ours_at_largest")
        growth = growth or summary["ours_largest_over_smallest"]
        speedup = speedup or summary["dense_over_ours_at_largest"]
        growth_value = growth["median"] if isinstance(growth, dict) else growth
        speed_value = speedup["median"] if isinstance(speedup, dict) else speedup
        sizes = sorted({r["num_classes"] for r in record["results"]})
        lines += scaling_section(backend, record, "num_classes", "K")
        lines += [
            "",
            f"- ours at K = {sizes[-1]:,} ÷ at K = {sizes[0]:,}: "
            f"{times(growth)} (goal ≤ {growth_goal}: "
            f"{verdict(growth_value <= growth_goal)})",
            f"- dense one-hot rule ÷ ours at K = {sizes[-1]:,}: {times(speedup, 1)} "
            f"(goal ≥ {speed_goal}: {verdict(speed_value >= speed_goal)})",
        ]
        if "torch_plain_over_ours_at_largest" in summary:
            plain = ratios.get(
                "torch_plain_over_ours_at_largest",
                summary["torch_plain_over_ours_at_largest"],
            )
            small = ratios.get("torch_plain_over_ours_at_smallest")
            lines.append(
                f"- plain PyTorch (KaiyangZhou style) ÷ ours at K = {sizes[-1]:,}: "
                f"{times(plain, 1)}"
                + (f"; at K = {sizes[0]:,}: {times(small)}" if small else "")
            )
        lines.append("")
        headline[backend] = (
            growth_value,
            growth_goal,
            speed_value,
            speed_goal,
            f"{sizes[-1]:,} ÷ {sizes[0]:,}",
        )
    if records:
        scaling_plot(
            records,
            plots,
            "center_loss_scaling",
            "num_classes",
            "classes K",
            "CenterLoss step",
        )
        lines += ["![CenterLoss scaling](plots/center_loss_scaling.png)", ""]
    return lines, headline


def memory_queue(records, plots):
    lines, headline = [], {}
    for backend, record in records.items():
        summary = record["summary"]
        goal = summary.get("goal_ours_largest_over_smallest", 1.3)
        ratios = summary.get("ratios", {})
        growth = (
            ratios.get("ours_largest_over_smallest")
            or summary["ours_largest_over_smallest"]
        )
        value = growth["median"] if isinstance(growth, dict) else growth
        sizes = sorted({r["size"] for r in record["results"]})
        lines += scaling_section(backend, record, "size", "queue size")
        read = ratios.get("ours_read_largest_over_smallest")
        whole = ratios.get("whole_largest_over_smallest")
        whole_over = ratios.get("whole_over_ours_at_largest")
        lines += [
            "",
            f"- MemoryQueue at {sizes[-1]:,} ÷ at {sizes[0]:,}: {times(growth)} "
            f"(goal ≤ {goal}: {verdict(value <= goal)})",
            f"- the same growth with the returned queue read: {times(read)}; "
            f"whole-queue rewrite: {times(whole, 1)}",
            f"- whole-queue rewrite ÷ MemoryQueue at {sizes[-1]:,}: "
            f"{times(whole_over, 1)}",
            "",
        ]
        headline[backend] = (value, goal, f"{sizes[-1]:,} ÷ {sizes[0]:,}")
    if records:
        scaling_plot(
            records,
            plots,
            "memory_queue_scaling",
            "size",
            "queue size",
            "enqueue step",
        )
        lines += ["![MemoryQueue scaling](plots/memory_queue_scaling.png)", ""]
    return lines, headline


def vector_quantizer(records, plots):
    lines, headline = [], {}
    goal = 0.5
    for backend, record in records.items():
        variants = list(dict.fromkeys(r["variant"] for r in record["results"]))
        sizes = sorted({r["num_embeddings"] for r in record["results"]})
        by = {(r["variant"], r["num_embeddings"]): r for r in record["results"]}
        rows = []
        for k in sizes:
            row = [f"{k:,}"]
            row += [spread(by[v, k]) if (v, k) in by else "–" for v in variants]
            row += [
                f"{by[v, k]['peak_memory_bytes'] / 2**20:.1f}" if (v, k) in by else "–"
                for v in variants
            ]
            ratio = record.get("ratios", {}).get(str(k), {})
            row.append(times(ratio.get("time_ours_over_one_hot")))
            row.append(times(ratio.get("peak_memory_ours_over_one_hot")))
            rows.append(row)
        lines += [f"### {NAMES[backend]}", "", machine(record), ""]
        lines += [
            f"Step: {record.get('step', '?')}; D = {record.get('D')}, "
            f"N = {record.get('N')}. Peak memory: {record.get('memory_method')}.",
            "",
        ]
        lines += table(
            ["K"]
            + [f"{v} ms" for v in variants]
            + [f"{v} MiB" for v in variants]
            + ["time ours ÷ one-hot", "peak ours ÷ one-hot"],
            rows,
        )
        largest = str(sizes[-1])
        peak = (
            record.get("ratios", {})
            .get(largest, {})
            .get("peak_memory_ours_over_one_hot")
        )
        if peak is not None:
            lines += [
                "",
                f"- peak memory ours ÷ one-hot at K = {sizes[-1]:,}: {peak:.2f}× "
                f"(goal ≤ {goal}: {verdict(peak <= goal)})",
            ]
            headline[backend] = (peak, goal, sizes[-1])
        lines.append("")
    if records:
        fig, axes = figure(len(records), nrows=2)
        for col, (backend, record) in enumerate(records.items()):
            variants = dict.fromkeys(r["variant"] for r in record["results"])
            for variant in variants:
                rows = sorted(
                    (r for r in record["results"] if r["variant"] == variant),
                    key=lambda r: r["num_embeddings"],
                )
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
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("codes K")
                ax.set_ylabel(label)
                ax.set_title(f"{NAMES[backend]}: {label.split(',')[0]}")
                ax.legend(fontsize=7)
        save(fig, plots / "vector_quantizer_scaling.png")
        lines += [
            "![VectorQuantizerEMA scaling](plots/vector_quantizer_scaling.png)",
            "",
        ]
    return lines, headline


def native(records, plots):
    lines, headline = [], {}
    for backend, record in records.items():
        lines += [f"### {NAMES[backend]}", "", machine(record), ""]
        lines += [
            f"{record.get('step', '?')}; batch {record.get('batch')}, width "
            f"{record.get('width')}. Time in ms, median (min–max); ratios: median "
            "of the per-round ratios (their quartiles in brackets).",
            "",
        ]
        for part, title in (("step", "Training step"), ("update", "The update alone")):
            rows = [
                [r["variant"], spread(r)]
                for r in record["results"]
                if r["part"] == part
            ]
            lines += [f"{title}:", ""]
            lines += table(["variant", "ms"], rows)
            lines += ["", "| ratio | value |", "|---|---|"]
            for key, ratio in record["ratios"][part].items():
                lines.append(f"| {key.replace('_over_', ' ÷ ')} | {times(ratio)} |")
            lines.append("")
        headline[backend] = record["ratios"]
    if records:
        fig, axes = figure(len(records), nrows=2)
        for col, (backend, record) in enumerate(records.items()):
            for row, part in enumerate(["step", "update"]):
                ax = axes[row][col]
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
                    f"{NAMES[backend]}: "
                    + ("training step" if part == "step" else "update alone")
                )
        save(fig, plots / "native_comparison.png")
        lines += ["![native comparison](plots/native_comparison.png)", ""]
    return lines, headline


# -------------------------------------------------------------- the report


def headline_rows(heads):
    """The headline table: one row per goal or figure, one column per backend."""

    def cell(backend, key, render):
        value = heads.get(key, {}).get(backend)
        return render(value) if value is not None else "not run"

    rows = [
        [
            "1",
            "update on ÷ frozen, worst layer and model",
            "≤ 1.05",
            *(
                cell(
                    b,
                    "update_overhead",
                    lambda v: (
                        f"{v[0][1]:.3f} ({v[0][0]}; A/A "
                        f"{v[0][2]['median'] if v[0][2] else float('nan'):.3f}): "
                        f"{verdict(v[0][1] <= v[1])}"
                    ),
                )
                for b in BACKENDS
            ),
        ],
        [
            "2",
            "CenterLoss step: ours at 100k ÷ at 10 classes",
            "≤ 1.5",
            *(
                cell(
                    b,
                    "center_loss_scaling",
                    lambda v: f"{v[0]:.2f}× ({v[4]}): {verdict(v[0] <= v[1])}",
                )
                for b in BACKENDS
            ),
        ],
        [
            "2",
            "CenterLoss: dense one-hot rule ÷ ours at 100k",
            "≥ 10",
            *(
                cell(
                    b,
                    "center_loss_scaling",
                    lambda v: (
                        f"{v[2]:.1f}× (K = {v[4].split()[0]}): {verdict(v[2] >= v[3])}"
                    ),
                )
                for b in BACKENDS
            ),
        ],
        [
            "3",
            "MemoryQueue: enqueue step at 65k ÷ at 1k",
            "≤ 1.3",
            *(
                cell(
                    b,
                    "memory_queue_scaling",
                    lambda v: f"{v[0]:.2f}× ({v[2]}): {verdict(v[0] <= v[1])}",
                )
                for b in BACKENDS
            ),
        ],
        [
            "4",
            "VectorQuantizerEMA: peak memory ÷ one-hot at 16,384 codes",
            "≤ 0.5",
            *(
                cell(
                    b,
                    "vector_quantizer_scaling",
                    lambda v: f"{v[0]:.2f}× (K = {v[2]:,}): {verdict(v[0] <= v[1])}",
                )
                for b in BACKENDS
            ),
        ],
        [
            "5",
            "Keras step: MovingMoments ÷ BatchNormalization",
            "–",
            *(
                cell(
                    b,
                    "native_comparison",
                    lambda v: times(
                        v["step"]["keras_moving_moments_over_keras_batch_norm"]
                    ),
                )
                for b in BACKENDS
            ),
        ],
        [
            "5",
            "update alone: MovingMoments ÷ native (JAX: `jax.jit` EMA; "
            "TensorFlow: `tf.function` EMA; PyTorch: `BatchNorm1d`)",
            "–",
            *(
                cell(
                    b,
                    "native_comparison",
                    lambda v: times(
                        v["update"].get("moving_moments_over_torch_batch_norm")
                        or v["update"]["moving_moments_over_native_ema"]
                    ),
                )
                for b in BACKENDS
            ),
        ],
        [
            "5",
            "step: Keras + MovingMoments ÷ native network + EMA",
            "–",
            *(
                cell(
                    b,
                    "native_comparison",
                    lambda v: times(v["step"]["keras_moving_moments_over_native_ema"]),
                )
                for b in BACKENDS
            ),
        ],
    ]
    return rows


def write_report(results: pathlib.Path, report: pathlib.Path) -> pathlib.Path:
    records = load(results)
    plots = report.parent / "plots"
    writers = {
        "update_overhead": update_overhead,
        "center_loss_scaling": center_loss,
        "memory_queue_scaling": memory_queue,
        "vector_quantizer_scaling": vector_quantizer,
        "native_comparison": native,
    }
    sections, heads = [], {}
    for benchmark, title in BENCHMARKS.items():
        found = {
            b: records[benchmark][b]
            for b in BACKENDS
            if b in records.get(benchmark, {})
        }
        sections += [f"## {title}", ""]
        if not found:
            sections += [f"_No results for `{benchmark}` in {results}._", ""]
            continue
        missing = [NAMES[b] for b in BACKENDS if b not in found]
        if missing:
            sections += [f"_Not run on {', '.join(missing)}._", ""]
        lines, heads[benchmark] = writers[benchmark](found, plots)
        sections += lines
        notes = HERE / "notes" / f"{benchmark}.md"
        if notes.exists():
            sections += ["#### Analysis", "", notes.read_text().strip(), ""]
    quick = any(r.get("quick") for group in records.values() for r in group.values())
    intro = [
        "# Benchmark report",
        "",
        "_Generated by `benchmarks/make_report.py` from the JSON in "
        f"`{_relative(results, report.parent)}`; do not edit by hand "
        "(the analysis paragraphs come from `benchmarks/notes/`)._ "
        "Reproduce with `python3 -m nox -s bench` (every backend, then this "
        "report), or one script on one backend: `KERAS_BACKEND=jax python "
        "benchmarks/update_overhead.py`.",
        "",
        "Timing discipline, every script: the first steps (compilation) are not "
        "timed; at least 20 steps per variant are timed after the warm-up; the "
        "variants take turns in rounds (alternating order); the result of each "
        "step is waited for (`block_until_ready` on JAX, the loss as NumPy); "
        "medians and min–max are reported. A ratio of two variants is the median "
        "of their per-round ratios (they ran back to back, so a change of load "
        "between rounds cancels), with the quartiles of those per-round ratios "
        "in brackets (min and max are in the JSON). Each section gives backend, "
        "versions, CPU, cores, threads, load and date beside its figures.",
        "",
    ]
    if quick:
        intro += [
            "**Some results below come from `--quick` runs (tiny sizes, few "
            "steps): they show that the scripts run, not how fast anything is.**",
            "",
        ]
    intro += ["## Headline", ""]
    intro += table(
        ["Q", "figure", "goal", *(NAMES[b] for b in BACKENDS)], headline_rows(heads)
    )
    intro.append("")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(intro + sections).rstrip() + "\n")
    print(f"written: {report} and {plots}/*.png")
    return report


def _relative(path: pathlib.Path, start: pathlib.Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path)


def main(argv=None):
    parse = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parse.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    parse.add_argument("--report", type=pathlib.Path, default=HERE / "REPORT.md")
    args = parse.parse_args(argv)
    write_report(args.results, args.report)


if __name__ == "__main__":
    main()
