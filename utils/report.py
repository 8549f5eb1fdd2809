"""The reproduction's report: a Markdown table and a plot, made from the runs' own result files."""
import json
import statistics
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

METHODS = ("float", "lsq", "basq-uniform", "basq")
METHOD_NAMES = {
    "float": "Full precision (no quantizer)",
    "lsq": "LSQ, no clip branches, no search",
    "basq-uniform": "BASQ, one L2 decay for all layers",
    "basq": "BASQ (k-fold search)",
}
ARCH_NAMES = {"mobilenet_v2": "MobileNet-v2", "resnet18": "ResNet-18"}


@dataclass
class Row:
    """One table cell's run: its stage-3 ``final_result.json`` and stage-2 ``search_result.json``."""

    arch: str
    method: str
    bits: int
    final: Path
    search: Path
    iters: int = 0  # stage-1 iterations per phase

    @cached_property
    def result(self) -> dict:
        """Stage 3's ``final_result.json``, read once."""
        return json.loads(self.final.read_text())

    def accuracies(self) -> list[float]:
        """Top-1 after fine-tuning, one per searched fold."""
        return [float(a) for a in self.result["bnfull_accs"]]

    def network(self) -> str:
        """The network's name and width, e.g. ``MobileNet-v2 x0.5``."""
        width = self.result["config"].get("width_multiplier")
        return ARCH_NAMES[self.arch] + (f" x{width:g}" if width is not None else "")

    def clips(self) -> list[float]:
        """Every clip value of the stage-1 supernet this row used (none for the baselines)."""
        return [c for layer in self.clips_by_layer() for c in layer]

    def clips_by_layer(self) -> list[list[float]]:
        """The clip values of each searchable layer's branches, in the supernet this row used."""
        from .checkpoint import load_file, state_dict_of

        supernet = self.result["supernet"]
        state = state_dict_of(load_file(supernet), supernet)
        layers: dict[str, list[float]] = {}
        for k, v in state.items():  # ``...branch_bn_q_1.{branch}.1.upper_bound``
            if k.endswith(".upper_bound"):
                layers.setdefault(k.rsplit(".", 3)[0], []).append(v.item())
        return list(layers.values())

    def decays(self) -> list[list[float]]:
        """The L2 decay each fold's choice gives each layer (empty for the single-branch baselines)."""
        l2_vals = self.result["config"]["l2_vals"]
        return [[l2_vals[b] for b in arch] for arch in self.result["archs"]] if l2_vals else []


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(row: Row | None) -> str:
    if row is None:
        return ""
    mean, sd = mean_sd(row.accuracies())
    return f"{mean:.2f} ± {sd:.2f}"


def _choice(row: Row) -> str:
    per_fold = row.decays()
    if not per_fold:
        return "-"
    if row.method == "basq-uniform":
        return ", ".join(f"{d[0]:g}" for d in per_fold)
    counts = Counter(d for fold in per_fold for d in fold)
    return ", ".join(f"{d:g}: {counts[d] / len(per_fold):.1f}" for d in sorted(counts, reverse=True))


def write_table(path: Path, rows: list[Row], meta: dict) -> str:
    """Write the Markdown report; return its main table (what the README quotes)."""
    bits = sorted({r.bits for r in rows if r.method != "float"})
    archs = list(dict.fromkeys(r.arch for r in rows))
    names = {r.arch: r.network() for r in rows}
    index = {(r.arch, r.method, r.bits if r.method != "float" else 32): r for r in rows}
    folds = len(rows[0].accuracies())
    header = ["Network", "Method", *(f"{b}-bit" for b in bits), "32-bit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arch in archs:
        for method in METHODS:
            cells = [_cell(index.get((arch, method, b))) for b in (*bits, 32)]
            if any(cells):
                lines.append(f"| {names[arch]} | {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    caption = (f"Top-1 (%) on Fashion-MNIST test images, mean ± standard deviation over {folds} folds: each "
               f"fold's choice is fine-tuned, then scored on the test images outside that fold.")
    gains = []
    for arch in archs:
        for b in bits:
            basq, lsq, uniform = (index.get((arch, m, b)) for m in ("basq", "lsq", "basq-uniform"))
            if basq and lsq and uniform:
                bm, lm, um = (mean_sd(r.accuracies())[0] for r in (basq, lsq, uniform))
                gains.append(f"| {names[arch]} | {b}-bit | {bm - lm:+.2f} | {bm - um:+.2f} |")
    choices = [f"| {names[r.arch]} | {METHOD_NAMES[r.method]} | {r.bits} | {_choice(r)} |"
               for r in rows if r.method in ("basq", "basq-uniform")]
    clips = []
    for r in rows:
        if r.method == "basq" and (values := r.clips()):
            clips.append(f"| {names[r.arch]} | {r.bits} | {len(values)} | {min(values):.2f} | "
                         f"{statistics.fmean(values):.2f} | {max(values):.2f} |")
    budget = meta["budget"]
    wall = sum(s["seconds"] for s in meta["sessions"]) / 60
    text = "\n".join([
        "# BASQ on Fashion-MNIST: a reduced-scale reproduction",
        "",
        f"Generated by `{meta['command']}` from its runs' result files. Machine: {meta['machine']}. "
        f"Wall time: {wall:.0f} min in {len(meta['sessions'])} session(s), "
        f"{meta['sessions'][-1]['jobs']} steps at a time; last finished {meta['sessions'][-1]['finished']}.",
        "",
        caption,
        "",
        table,
        "",
        f"Budget of every row: stage 1 trains {budget['iters'][0]} iterations per phase (activations "
        f"quantized, then weights too; batch 128, Adam 2e-3, labels as the loss), stage 2 searches "
        f"folds {budget['folds']} of 10, stage 3 fine-tunes {budget['finetune_iters']} iterations. "
        "28 px inputs, stride-1 stem (`--small_input_stem`). Anchor: the Fashion-MNIST benchmark lists "
        "95.0 % for a full-precision MobileNet and 94.9 % for ResNet-18, trained far longer.",
        "",
        "What the search and the branches buy (difference of the means, points of top-1):",
        "",
        "| Network | Bits | BASQ - LSQ | BASQ - one L2 for all |",
        "|---|---|---|---|",
        *gains,
        "",
        "Decays chosen: per fold for one L2 for all layers; for the search, the mean number of layers "
        "that take each decay.",
        "",
        "| Network | Method | Bits | Decays |",
        "|---|---|---|---|",
        *choices,
        "",
        "Clip values of the BASQ supernets after stage 1 (every branch of every searchable layer; "
        "they start at 6.0):",
        "",
        "| Network | Bits | Clips | Min | Mean | Max |",
        "|---|---|---|---|---|---|",
        *clips,
        "",
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return f"{caption}\n\n{table}"


def write_plot(path: Path, rows: list[Row]) -> None:
    """Top-1 against bits, one panel per network, one line per method (full precision dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r.arch for r in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        for method in METHODS:
            mine = sorted((r for r in rows if r.arch == arch and r.method == method), key=lambda r: r.bits)
            if not mine:
                continue
            stats = [mean_sd(r.accuracies()) for r in mine]
            if method == "float":
                ax.axhline(stats[0][0], ls="--", color="gray", label=METHOD_NAMES[method])
                continue
            ax.errorbar([r.bits for r in mine], [m for m, _ in stats], yerr=[s for _, s in stats],
                        marker="o", capsize=3, label=METHOD_NAMES[method])
        ax.set_title(f"{next(r for r in rows if r.arch == arch).network()}, Fashion-MNIST")
        ax.set_xlabel("bits (weights and activations)")
        ax.set_ylabel("top-1 (%)")
        ax.set_xticks(sorted({r.bits for r in rows if r.method != "float"}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sweep_table(path: Path, rows: list[Row], meta: dict) -> str:
    """The budget sweep's report: top-1 per method and budget, the differences that matter, how far
    the clips travelled; return its main table (what the README quotes)."""
    budgets = sorted({r.iters for r in rows})
    index = {(r.method, r.iters): r for r in rows}
    folds = len(rows[0].accuracies())
    means = {key: mean_sd(r.accuracies())[0] for key, r in index.items()}
    header = ["Method", *(f"{b} it" for b in budgets)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in METHODS:
        cells = [_cell(index.get((method, b))) for b in budgets]
        if any(cells):
            lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
    differences = (("BASQ - LSQ", ("basq", "lsq")), ("search - one L2 for all", ("basq", "basq-uniform")))
    for name, (a, b) in differences:
        diffs = [f"{means[a, it] - means[b, it]:+.2f}" if (a, it) in means and (b, it) in means else ""
                 for it in budgets]
        lines.append(f"| {name} | " + " | ".join(diffs) + " |")
    travel = []
    for it in budgets:
        if (basq := index.get(("basq", it))) is not None and (layers := basq.clips_by_layer()):
            spreads = [max(layer) - min(layer) for layer in layers]
            clips = [c for layer in layers for c in layer]
            travel.append(f"| {it} | {statistics.fmean(clips):.2f} | {min(clips):.2f} | {max(clips):.2f} | "
                          f"{statistics.fmean(spreads):.2f} | {max(spreads):.2f} |")
    table = "\n".join(lines)
    network = rows[0].network()
    caption = (f"{network}, {rows[0].bits}-bit weights and activations: top-1 (%) on Fashion-MNIST test "
               "images against the stage-1 budget (iterations per phase), mean ± standard deviation "
               f"over {folds} folds, scored as the results table (each fold's choice fine-tuned, then "
               "scored outside the fold).")
    budget = meta["budget"]
    wall = sum(s["seconds"] for s in meta["sessions"]) / 60
    text = "\n".join([
        "# BASQ against LSQ as the training budget grows",
        "",
        f"Generated by `{meta['command']}` from its runs' result files. Machine: {meta['machine']}. "
        f"Wall time: {wall:.0f} min in {len(meta['sessions'])} session(s), "
        f"{meta['sessions'][-1]['jobs']} steps at a time; last finished {meta['sessions'][-1]['finished']}.",
        "",
        caption,
        "",
        table,
        "",
        f"Every budget: stage 1 trains the given iterations per phase (activations quantized, then "
        f"weights too; batch 128, Adam 2e-3 cosine-annealed, labels as the loss, every parameter stepped "
        f"every iteration as the reference), stage 2 searches folds {budget['folds']} of 10 on "
        f"{budget['max_val_iters'] * 200} test images, stage 3 fine-tunes {budget['finetune_iters']} "
        "iterations. 32 px inputs through the ImageNet stem (the demo's model), four candidate decays "
        "(0.01, 0.001, 0.0001, 0.00001).",
        "",
        "How far the clips travelled in stage 1 (every branch of every searchable layer of the BASQ "
        "supernet; they start at 6.0), and how far apart a layer's branches ended:",
        "",
        "| Iterations | Mean clip | Min | Max | Mean spread of a layer | Max spread |",
        "|---|---|---|---|---|---|",
        *travel,
        "",
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return f"{caption}\n\n{table}"


def write_sweep_plot(path: Path, rows: list[Row]) -> None:
    """Top-1 against the stage-1 budget (log axis), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.iters)
        if mine:
            stats = [mean_sd(r.accuracies()) for r in mine]
            ax.errorbar([r.iters for r in mine], [m for m, _ in stats], yerr=[s for _, s in stats],
                        marker="o", capsize=3, label=METHOD_NAMES[method],
                        ls="--" if method == "float" else "-")
    ax.set_xscale("log")
    budgets = sorted({r.iters for r in rows})
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.set_xlabel("stage-1 iterations per phase (batch 128)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{rows[0].network()}, {rows[0].bits}-bit, Fashion-MNIST")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_readme(readme: Path, table: str, section: str = "reproduce") -> bool:
    """Put ``table`` between the README's ``<!-- {section}:begin -->`` and ``:end`` markers;
    ``False`` when it has none."""
    begin_marker, end_marker = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = readme.read_text()
    begin, end = text.find(begin_marker), text.find(end_marker)
    if begin < 0 or end < begin:
        return False
    readme.write_text(text[:begin + len(begin_marker)] + "\n" + table + "\n" + text[end:])
    return True
