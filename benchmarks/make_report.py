"""Write benchmarks/REPORT.md and its plots from the JSON results.

Reads every `<benchmark>_<backend>.json` in the results folder, and writes
the report (a headline table of the goals, then one section per question
with a table per backend, the machine and versions beside the figures, the
plots, and the hand-written analysis in benchmarks/notes/<benchmark>.md when
there is one) and PNG plots in `plots/` beside the report (drawn by
`report_plots.py`). The goals come from the JSON: each script writes its own
under `"goals"`, as `{figure: {"max": limit}}` or `{figure: {"min": limit}}`.

    python benchmarks/make_report.py [--results DIR] [--report FILE]

Needs only matplotlib (no backend, no Keras).
"""

# The report is Markdown with Unicode signs (×, ÷, –, ≤): intended.
# ruff: noqa: RUF001, RUF002, RUF003

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import report_plots
from report_plots import NAMES

HERE = pathlib.Path(__file__).resolve().parent
BACKENDS = ["jax", "tensorflow", "torch"]
BENCHMARKS = {
    "update_overhead": "1. Overhead of the update",
    "center_loss_scaling": "2. CenterLoss scaling",
    "center_loss_batch_sweep": "2b. CenterLoss batch sweep",
    "memory_queue_scaling": "3. MemoryQueue scaling",
    "vector_quantizer_scaling": "4. VectorQuantizerEMA: time and peak memory",
    "native_comparison": "5. Against Keras's BatchNormalization and native code",
    "averaged_model": "6. AveragedModel against the optimizer's use_ema",
    "sync_batch_norm_overhead": "7. SyncBatchNormalization on one device",
}


# ---------------------------------------------------------------- figures


@dataclasses.dataclass(frozen=True)
class Goal:
    """A bound on one figure, as a script writes it: `{"max": 1.05}`."""

    bound: str  # "max" or "min"
    limit: float

    @classmethod
    def of(cls, record: dict, figure: str) -> Goal:
        """The goal that `record` (one JSON file) sets on `figure`."""
        goals = record.get("goals", {})
        if figure not in goals:
            raise ValueError(
                f"{record['benchmark']}_{record['backend']}.json sets no goal on "
                f"{figure!r}; received goals {goals}. Rerun the script, or add "
                f'"goals": {{"{figure}": {{"max": <limit>}}}} (or "min") to the file.'
            )
        ((bound, limit),) = goals[figure].items()
        return cls(bound, limit)

    def met(self, value: float) -> bool:
        return value <= self.limit if self.bound == "max" else value >= self.limit

    def text(self, spec: str = "") -> str:
        """`≤ 1.05` or `≥ 10.0`; `spec` formats the limit (`g`: `≥ 10`)."""
        return f"{'≤' if self.bound == 'max' else '≥'} {self.limit:{spec}}"

    def check(self, value: float) -> str:
        """`goal ≤ 1.5: met`."""
        return f"goal {self.text()}: {verdict(self.met(value))}"


@dataclasses.dataclass(frozen=True)
class Headline:
    """One cell of the headline table: a figure of one backend.

    Args:
        label: what the figure is (the table's row).
        figure: the figure as the cell shows it.
        value: the number the goal is checked on (with a goal).
        goal: the goal, or None for a figure without one.
    """

    label: str
    figure: str
    value: float | None = None
    goal: Goal | None = None

    @classmethod
    def ratio(cls, label: str, value: float, context: str, goal: Goal, digits: int = 2):
        """`1.02× (100,000 ÷ 10)`, checked against `goal`."""
        return cls(label, f"{value:.{digits}f}× ({context})", value, goal)

    def cell(self) -> str:
        if self.goal is None or self.value is None:
            return self.figure
        return f"{self.figure}: {verdict(self.goal.met(self.value))}"


Headlines = dict[str, list[Headline]]  # {backend: its headline figures}
Section = tuple[list[str], list[Headline]]  # a backend's lines, headlines


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
        if "ci_low" in ratio:
            low, high = ratio["ci_low"], ratio["ci_high"]
            text += f" (90% CI {low:.{digits}f}–{high:.{digits}f})"
        elif "round_q25" in ratio:
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
    versions = record["versions"]
    backend = record["backend"]
    version = versions.get(backend) or versions.get("tensorflow-cpu") or "?"
    parts = [
        f"{NAMES[backend]} {version}",
        f"Keras {versions['keras']}",
        f"keras_stateful {versions.get('keras_stateful', '?')}",
        record["cpu"],
        f"{record['cores']} cores",
        _threads(record),
    ]
    load = record.get("load_average_start")
    if load:
        parts.append(f"load {load[0]:.1f} at start")
    parts.append(record["date"][:16].replace("T", " ") + " UTC")
    parts += _provenance(record)
    return "_" + ", ".join(parts) + "_"


def _threads(record: dict) -> str:
    if "threads" not in record:
        return "threads not recorded"
    requested = (record["threads"] or {}).get("requested")
    return f"{requested} intra-op thread(s)" if requested else "default threads"


def _provenance(record: dict) -> list[str]:
    """Commit and library source hash when recorded; a warning on a quick run."""
    parts = []
    if record.get("commit"):
        parts.append(f"commit {record['commit']}")
    if record.get("keras_stateful_source_sha256"):
        parts.append(f"library source {record['keras_stateful_source_sha256']}")
    if record.get("quick"):
        parts.append("**quick run: sizes and steps cut, not representative**")
    return parts


def heading(backend: str, record: dict) -> list[str]:
    """A backend's subsection heading and its machine line."""
    return [f"### {NAMES[backend]}", "", machine(record), ""]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def sizes_of(record: dict, size_key: str) -> list[int]:
    return sorted({r[size_key] for r in record["results"]})


def _ends(record: dict, size_key: str) -> tuple[str, str]:
    """The smallest and the largest size, written `100,000`."""
    sizes = sizes_of(record, size_key)
    return f"{sizes[0]:,}", f"{sizes[-1]:,}"


def scaling_section(backend: str, record: dict, size_key: str, label: str) -> list[str]:
    """A backend's heading, machine line and table: one row per size, a
    column per variant (step time in ms, median and min–max)."""
    results = record["results"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    by = {(r["variant"], r[size_key]): r for r in results}
    rows = [
        [f"{k:,}"] + [spread(by[v, k]) if (v, k) in by else "–" for v in variants]
        for k in sizes_of(record, size_key)
    ]
    return [
        *heading(backend, record),
        f"Step: {record.get('step', '?')}; D = {record.get('D')}, "
        f"B = {record.get('B')}. Step time in ms, median (min–max).",
        "",
        *table([label, *variants], rows),
    ]


def goal_line(text: str, ratio: dict, goal: Goal, digits: int = 2) -> str:
    """`- <text>: 1.02× (0.91–1.07) (goal ≤ 1.5: met)`."""
    return f"- {text}: {times(ratio, digits)} ({goal.check(ratio['median'])})"


# ------------------------------------------------------------- questions


def update_overhead(backend: str, record: dict) -> Section:
    """Question 1: a table per backend; the worst layer as headline."""
    goal = Goal.of(record, "on_over_frozen")
    return overhead_table(backend, record, goal), [overhead_headline(record, goal)]


def overhead_table(backend: str, record: dict, goal: Goal) -> list[str]:
    by = {(r["model"], r["layer"], r["variant"]): r for r in record["results"]}
    rows = [
        overhead_row(key, ratio, by, goal) for key, ratio in record["ratios"].items()
    ]
    header = ["model", "layer", "on", "frozen", "no update", "without"]
    header += ["on ÷ frozen", goal.text(), "A/A: frozen′ ÷ frozen"]
    header += ["on ÷ no update", "on ÷ without"]
    return [
        *heading(backend, record),
        f"Step: {record.get('step', '?')}; batch {record.get('batch')}, "
        f"MLP width {record.get('mlp_width')}, "
        f"{record.get('rounds')} rounds × {record.get('steps_per_round')} "
        "step(s) per variant. Times: median step, ms. Ratios: median of the "
        "per-round ratios (their quartiles in brackets). The A/A column "
        "compares two separately built frozen models, the same program: "
        "its distance from 1 is the noise of this machine.",
        "",
        *table(header, rows),
        "",
    ]


def overhead_row(key: str, ratio: dict, by: dict, goal: Goal) -> list[str]:
    """One layer in one model: its step times, then its ratios."""
    model, layer = key.split("/")
    variants = ("on", "frozen", "no_update", "without")
    return [
        model.upper(),
        layer,
        *(ms(by[model, layer, v]["median_s"]) for v in variants),
        times(ratio["on_over_frozen"], 3),
        verdict(goal.met(ratio["on_over_frozen"]["median"])),
        times(ratio.get("frozen_copy_over_frozen"), 3),
        times(ratio["on_over_no_update"]),
        times(ratio["on_over_without"]),
    ]


def overhead_headline(record: dict, goal: Goal) -> Headline:
    """The layer and model with the largest on ÷ frozen, and its A/A control."""
    ratios = record["ratios"]
    key = max(ratios, key=lambda k: ratios[k]["on_over_frozen"]["median"])
    worst = ratios[key]["on_over_frozen"]["median"]
    control = ratios[key].get("frozen_copy_over_frozen")
    noise = control["median"] if control else float("nan")
    return Headline(
        "update on ÷ frozen, worst layer and model",
        f"{worst:.3f} ({key}; A/A {noise:.3f})",
        worst,
        goal,
    )


def center_loss(backend: str, record: dict) -> Section:
    """Question 2: growth of our step with K, and the dense rule against ours."""
    ratios = record["summary"]["ratios"]
    growth = ratios["ours_largest_over_smallest"]
    speedup = ratios["dense_over_ours_at_largest"]
    growth_goal = Goal.of(record, "ours_largest_over_smallest")
    speed_goal = Goal.of(record, "dense_over_ours_at_largest")
    small, large = _ends(record, "num_classes")
    lines = [
        *scaling_section(backend, record, "num_classes", "K"),
        "",
        goal_line(f"ours at K = {large} ÷ at K = {small}", growth, growth_goal),
        goal_line(f"dense one-hot rule ÷ ours at K = {large}", speedup, speed_goal, 1),
        *plain_torch_line(ratios, small, large),
        "",
    ]
    return lines, [
        Headline.ratio(
            "CenterLoss step: ours at 100k ÷ at 10 classes",
            growth["median"],
            f"{large} ÷ {small}",
            growth_goal,
        ),
        Headline.ratio(
            "CenterLoss: dense one-hot rule ÷ ours at 100k",
            speedup["median"],
            f"K = {large}",
            speed_goal,
            digits=1,
        ),
    ]


def center_loss_batches(backend: str, record: dict) -> Section:
    """Question 2b: the step time CenterLoss adds, against the batch size."""
    goal = Goal.of(record, "increment_largest_over_1024")
    growth = record["summary"]["increment_largest_over_1024"]
    largest, k_goal = record["summary"]["largest_batch"], record["K_goal"]
    increments = record["increments"]
    classes = sorted({r["num_classes"] for r in increments})
    by = {(r["batch"], r["num_classes"]): r for r in increments}
    rows = [
        [f"{b:,}"] + [spread(by[b, k]) if (b, k) in by else "–" for k in classes]
        for b in sorted({r["batch"] for r in increments})
    ]
    context = f"B = {largest:,} ÷ 1,024, K = {k_goal:,}"
    lines = [
        *heading(backend, record),
        f"Step: {record.get('step', '?')}; D = {record.get('D')}. The time "
        "CenterLoss adds to the step, in ms: per round the median step with "
        "it minus the median step without it (back to back), median (min–max) "
        f"over {record.get('rounds')} rounds.",
        "",
        *table(["B", *[f"K = {k:,}" for k in classes]], rows),
        "",
        f"- increment at {context}: {growth:.1f}× ({goal.check(growth)})",
        "",
    ]
    return lines, [
        Headline.ratio(
            "CenterLoss increment: B = 16,384 ÷ B = 1,024",
            growth,
            context,
            goal,
            digits=1,
        )
    ]


def plain_torch_line(ratios: dict, small: str, large: str) -> list[str]:
    """The KaiyangZhou-style plain PyTorch rule against ours (PyTorch only)."""
    plain = ratios.get("torch_plain_over_ours_at_largest")
    if plain is None:
        return []
    return [
        f"- plain PyTorch (KaiyangZhou style) ÷ ours at K = {large}: "
        f"{times(plain, 1)}; at K = {small}: "
        f"{times(ratios['torch_plain_over_ours_at_smallest'])}"
    ]


def memory_queue(backend: str, record: dict) -> Section:
    """Question 3: growth of the enqueue step with the queue size."""
    ratios = record["summary"]["ratios"]
    growth = ratios["ours_largest_over_smallest"]
    goal = Goal.of(record, "ours_largest_over_smallest")
    small, large = _ends(record, "size")
    lines = [
        *scaling_section(backend, record, "size", "queue size"),
        "",
        goal_line(f"MemoryQueue at {large} ÷ at {small}", growth, goal),
        "- the same growth with the returned queue read: "
        f"{times(ratios['ours_read_largest_over_smallest'])}; whole-queue "
        f"rewrite: {times(ratios['whole_largest_over_smallest'], 1)}",
        f"- whole-queue rewrite ÷ MemoryQueue at {large}: "
        f"{times(ratios['whole_over_ours_at_largest'], 1)}",
        "",
    ]
    head = Headline.ratio(
        "MemoryQueue: enqueue step at 65k ÷ at 1k",
        growth["median"],
        f"{large} ÷ {small}",
        goal,
    )
    return lines, [head]


def vector_quantizer(backend: str, record: dict) -> Section:
    """Question 4: time and peak memory against one-hot, per number of codes."""
    goal = Goal.of(record, "peak_memory_ours_over_one_hot")
    _, large = _ends(record, "num_embeddings")
    largest = sizes_of(record, "num_embeddings")[-1]
    peak = record["ratios"][str(largest)]["peak_memory_ours_over_one_hot"]
    lines = [
        *vector_quantizer_table(backend, record),
        "",
        f"- peak memory ours ÷ one-hot at K = {large}: {peak:.2f}× "
        f"({goal.check(peak)})",
        "",
    ]
    head = Headline.ratio(
        "VectorQuantizerEMA: peak memory ÷ one-hot at 16,384 codes",
        peak,
        f"K = {large}",
        goal,
    )
    return lines, [head]


def vector_quantizer_table(backend: str, record: dict) -> list[str]:
    """Per K: each variant's step time and peak memory, then ours ÷ one-hot."""
    variants = list(dict.fromkeys(r["variant"] for r in record["results"]))
    by = {(r["variant"], r["num_embeddings"]): r for r in record["results"]}
    rows = []
    for k in sizes_of(record, "num_embeddings"):
        ratio = record["ratios"][str(k)]
        rows.append(
            [
                f"{k:,}",
                *(spread(by[v, k]) if (v, k) in by else "–" for v in variants),
                *(
                    f"{by[v, k]['peak_memory_bytes'] / 2**20:.1f}"
                    if (v, k) in by
                    else "–"
                    for v in variants
                ),
                times(ratio["time_ours_over_one_hot"]),
                times(ratio["peak_memory_ours_over_one_hot"]),
            ]
        )
    header = ["K", *(f"{v} ms" for v in variants), *(f"{v} MiB" for v in variants)]
    header += ["time ours ÷ one-hot", "peak ours ÷ one-hot"]
    return [
        *heading(backend, record),
        f"Step: {record.get('step', '?')}; D = {record.get('D')}, "
        f"N = {record.get('N')}. Peak memory: {record.get('memory_method')}.",
        "",
        *table(header, rows),
    ]


def native(backend: str, record: dict) -> Section:
    """Question 5: against Keras's BatchNormalization and native code."""
    lines = native_tables(backend, record)
    heads = native_headlines(record["ratios"])
    update = record["ratios"]["update"]
    for figure in record.get("goals", {}):
        goal = Goal.of(record, figure)
        value = update[figure]["median"]
        lines.append(
            goal_line(
                f"update alone: {figure.replace('_over_', ' ÷ ')}", update[figure], goal
            )
        )
        heads.append(
            Headline.ratio(
                f"update alone: {figure.replace('_over_', ' ÷ ')}",
                value,
                f"batch {record.get('batch')} x {record.get('width')}",
                goal,
            )
        )
    if "aten_ops_per_update" in record:
        counts = ", ".join(
            f"{name} {count}" for name, count in record["aten_ops_per_update"].items()
        )
        lines.append(f"- ATen ops per update (torch.profiler, top level): {counts}")
    if record.get("goals") or "aten_ops_per_update" in record:
        lines.append("")
    return lines, heads


def native_tables(backend: str, record: dict) -> list[str]:
    """The training step, then the update alone: times, then ratios."""
    lines = [
        *heading(backend, record),
        f"{record.get('step', '?')}; batch {record.get('batch')}, width "
        f"{record.get('width')}. Time in ms, median (min–max); ratios: median "
        "of the per-round ratios (their quartiles in brackets).",
        "",
    ]
    for part, title in (("step", "Training step"), ("update", "The update alone")):
        rows = [
            [r["variant"], spread(r)] for r in record["results"] if r["part"] == part
        ]
        lines += [f"{title}:", "", *table(["variant", "ms"], rows), ""]
        lines += table(
            ["ratio", "value"],
            [
                [key.replace("_over_", " ÷ "), times(ratio)]
                for key, ratio in record["ratios"][part].items()
            ],
        )
        lines.append("")
    return lines


def native_headlines(ratios: dict) -> list[Headline]:
    step, update = ratios["step"], ratios["update"]
    return [
        Headline(
            "Keras step: MovingMoments ÷ BatchNormalization",
            times(step["keras_moving_moments_over_keras_batch_norm"]),
        ),
        Headline(
            "update alone: MovingMoments ÷ native (JAX: `jax.jit` EMA; "
            "TensorFlow: `tf.function` EMA; PyTorch: `BatchNorm1d`)",
            times(
                update.get("moving_moments_over_torch_batch_norm")
                or update["moving_moments_over_native_ema"]
            ),
        ),
        Headline(
            "step: Keras + MovingMoments ÷ native network + EMA",
            times(step["keras_moving_moments_over_native_ema"]),
        ),
    ]


def averaged_model(backend: str, record: dict) -> Section:
    """Question 6: AveragedModel's step increment against use_ema's; memory."""
    ratios, memory = record["ratios"], record["memory"]
    increment = ratios["averaged_increment_over_use_ema"]
    goal = Goal.of(record, "averaged_increment_over_use_ema")
    copies_goal = Goal.of(record, "extra_float32_copies")
    copies = memory["extra_float32_copies"]
    rows = [[r["variant"], spread(r)] for r in record["results"]]
    lines = [
        *heading(backend, record),
        f"{record.get('step', '?')}; batch {record.get('batch')}, MLP "
        f"{record.get('widths')} ({memory['parameters']:,} parameters). Time in "
        "ms, median (min–max).",
        "",
        *table(["variant", "ms"], rows),
        "",
        goal_line(
            "the update, (averaged − averaged_no_update) ÷ (use_ema − plain), "
            "medians of per-round differences",
            increment,
            goal,
        ),
        f"- the update alone: {ms(ratios['update_alone_s'])} ms, use_ema's "
        f"increment: {ms(ratios['use_ema_increment_s'])} ms",
        *informative_increments(ratios),
        "- with the one-sample teacher forward and the wiring, (averaged − "
        f"plain) ÷ (use_ema − plain): {times(ratios['with_teacher_over_use_ema'])}"
        " (for information)",
        f"- averaged ÷ plain: {times(ratios['averaged_over_plain'])}, use_ema ÷ "
        f"plain: {times(ratios['use_ema_over_plain'])}, teacher on the whole "
        f"batch ÷ plain: {times(ratios['averaged_batch_over_plain'])}",
        f"- memory: the averaged copy is {copies:.3f} float32 copies of the MLP's "
        f"variables ({copies_goal.check(copies)}); use_ema's copy: "
        f"{memory['use_ema_copy_bytes']:,} bytes",
    ]
    if "foreach_lerp" in record:
        lines.append(
            "- timm-style `torch._foreach_lerp_` on the same tensors, alone: "
            f"{spread(record['foreach_lerp'])} ms (for information)"
        )
    lines.append("")
    heads = [
        Headline.ratio(
            "AveragedModel: update increment ÷ use_ema's (5M-parameter MLP)",
            increment["median"],
            "5M MLP",
            goal,
        ),
        Headline(
            "AveragedModel: extra float32 copies of the weights",
            f"{copies:.3f}",
            copies,
            copies_goal,
        ),
    ]
    return lines, heads


def informative_increments(ratios: dict) -> list[str]:
    """The update's increment without its check, and in Mean Teacher's wiring."""
    labels = {
        "unguarded_increment_over_use_ema": "without the finiteness check "
        "(`guard_non_finite=False`)",
        "teacher_in_loss_increment_over_use_ema": "with the teacher's output in "
        "the loss (Mean Teacher's wiring)",
    }
    return [
        f"- the update {label}, ÷ use_ema's increment: {times(ratios[key])} "
        "(for information)"
        for key, label in labels.items()
        if key in ratios
    ]


def sync_batch_norm(backend: str, record: dict) -> Section:
    """Question 7: SyncBatchNormalization ÷ BatchNormalization, one device."""
    goal = Goal.of(record, "sync_over_keras")
    rows = [
        [r["model"], r["variant"], str(r["batch"]), spread(r)]
        for r in record["results"]
    ]
    worst = record["sync_over_keras"]
    lines = [
        *heading(backend, record),
        f"{record.get('step', '?')}. Time in ms, median (min–max).",
        "",
        *table(["model", "variant", "batch", "ms"], rows),
        "",
        *[
            f"- {kind}: SyncBatchNormalization ÷ BatchNormalization {times(ratio)}"
            for kind, ratio in record["ratios"].items()
        ],
        goal_line(f"the worse ({worst['model']})", worst, goal),
        "",
    ]
    head = Headline.ratio(
        "SyncBatchNormalization ÷ BatchNormalization, training step, one device",
        worst["median"],
        worst["model"],
        goal,
    )
    return lines, [head]


# -------------------------------------------------------------- the report

# benchmark: (its section on one backend, the alt text of its plot)
SECTIONS = {
    "update_overhead": (update_overhead, "update overhead"),
    "center_loss_scaling": (center_loss, "CenterLoss scaling"),
    "center_loss_batch_sweep": (center_loss_batches, "CenterLoss batch sweep"),
    "memory_queue_scaling": (memory_queue, "MemoryQueue scaling"),
    "vector_quantizer_scaling": (vector_quantizer, "VectorQuantizerEMA scaling"),
    "native_comparison": (native, "native comparison"),
    "averaged_model": (averaged_model, "AveragedModel step times"),
    "sync_batch_norm_overhead": (sync_batch_norm, "SyncBatchNormalization overhead"),
}


def benchmark_section(benchmark: str, records: dict, plots: pathlib.Path):
    """(a benchmark's section on every backend and its plot, its headlines)."""
    section, alt = SECTIONS[benchmark]
    lines, heads = [], {}
    for backend, record in records.items():
        more, heads[backend] = section(backend, record)
        lines += more
    path = report_plots.draw(benchmark, records, plots)
    lines += [f"![{alt}](plots/{path.name})", ""]
    return lines, heads


def headline_rows(heads: dict[str, Headlines]) -> list[list[str]]:
    """The headline table: a row per figure (its goal from the first backend
    that has it), a column per backend, `not run` where a backend has none."""
    rows = []
    for benchmark, by_backend in heads.items():
        question = BENCHMARKS[benchmark].split(".")[0]
        firsts: dict[str, Headline] = {}
        for backend in BACKENDS:
            for head in by_backend.get(backend, []):
                firsts.setdefault(head.label, head)
        cells = {(b, h.label): h.cell() for b, hs in by_backend.items() for h in hs}
        for label, first in firsts.items():
            goal = first.goal.text("g") if first.goal else "–"
            row = [question, label, goal]
            rows.append(row + [cells.get((b, label), "not run") for b in BACKENDS])
    return rows


def sections(records, results: pathlib.Path, plots: pathlib.Path):
    """(the sections' lines, {benchmark: its headline figures})."""
    lines, heads = [], {}
    for benchmark, title in BENCHMARKS.items():
        group = records.get(benchmark, {})
        found = {b: group[b] for b in BACKENDS if b in group}
        lines += [f"## {title}", ""]
        if not found:
            lines += [f"_No results for `{benchmark}` in {results}._", ""]
            continue
        missing = [NAMES[b] for b in BACKENDS if b not in found]
        if missing:
            lines += [f"_Not run on {', '.join(missing)}._", ""]
        section, heads[benchmark] = benchmark_section(benchmark, found, plots)
        lines += section
        notes = HERE / "notes" / f"{benchmark}.md"
        if notes.exists():
            lines += ["#### Analysis", "", notes.read_text().strip(), ""]
    return lines, heads


def intro(results: pathlib.Path, report: pathlib.Path, quick: bool) -> list[str]:
    lines = [
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
        lines += [
            "**Some results below come from `--quick` runs (tiny sizes, few "
            "steps): they show that the scripts run, not how fast anything is.**",
            "",
        ]
    return lines


def write_report(results: pathlib.Path, report: pathlib.Path) -> pathlib.Path:
    records = load(results)
    plots = report.parent / "plots"
    body, heads = sections(records, results, plots)
    quick = any(r.get("quick") for group in records.values() for r in group.values())
    head = [*intro(results, report, quick), "## Headline", ""]
    head += table(
        ["Q", "figure", "goal", *(NAMES[b] for b in BACKENDS)], headline_rows(heads)
    )
    head.append("")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(head + body).rstrip() + "\n")
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
