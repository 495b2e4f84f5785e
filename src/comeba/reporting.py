"""What the command line and the evaluation show: text tables, the checkpoints' CSV, the metrics plot.

- `comeba edit`'s before/after table of greedy answers (`build_table`,
  `format_table`, `edit_summary`; an edit is `taken` when the answer starts
  with the new target);
- `comeba eval`'s pre/post table (`format_summary`, `format_times`);
- a run folder's checkpoints.csv (`checkpoints_csv`) and metrics.png
  (`plot_checkpoints`; matplotlib is imported only there).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from .plan import Plan


# ----------------------------------------------------------------------------- `comeba edit`: greedy answers


def taken(answer: str, target: str) -> bool:
    """An edit is taken when the greedy continuation (stripped) starts with the target (stripped)."""
    return answer.strip().startswith(target.strip())


def flat(text: str, width: int | None = None) -> str:
    """A continuation on one line (newlines shown as ⏎), cut to `width` characters."""
    text = text.replace("\r", "").replace("\n", "⏎")
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


@dataclass
class Row:
    """One prompt shown in the before/after table."""

    kind: str  # "edit" | "rephrase" | "control"
    index: int
    prompt: str
    expected: str  # target for edit/rephrase; control ground truth
    before: str = ""
    after: str = ""

    @property
    def mark(self) -> str:
        if self.kind == "control":
            return "unchanged" if self.after == self.before else "CHANGED"
        return "taken" if taken(self.after, self.expected) else "not taken"


@dataclass
class Table:
    """The rows of the before/after table, in order: each edit, its rephrasings, its controls."""

    rows: list[Row] = field(default_factory=list)

    def prompts(self) -> list[str]:
        return [r.prompt for r in self.rows]

    def of(self, kind: str) -> list[Row]:
        return [r for r in self.rows if r.kind == kind]


def build_table(requests) -> Table:
    """A row per request prompt, rephrasing and locality prompt (the controls), answers still empty."""
    table = Table()
    for i, r in enumerate(requests):
        table.rows.append(Row("edit", i, r.text, r.target_new))
        for p in r.rephrase_prompts:
            table.rows.append(Row("rephrase", i, p, r.target_new))
        for j, p in enumerate(r.locality_prompts):
            truth = r.locality_ground_truths[j] if j < len(r.locality_ground_truths) else ""
            table.rows.append(Row("control", i, p, truth))
    return table


def format_table(table: Table, requests, width: int = 30, prompt_width: int = 52) -> str:
    """The before/after table as aligned text columns, a blank line between edits."""
    headers = ("#", "kind", "prompt", "expected", "before", "after", "result")
    lines: list[tuple[str, ...]] = []
    for row in table.rows:
        req = requests[row.index]
        expected = row.expected.strip()
        if row.kind != "control" and req.ground_truth:
            expected = f"{expected} (was {req.ground_truth.strip()})"
        lines.append((
            str(row.index + 1) if row.kind == "edit" else "",
            row.kind,
            flat(row.prompt, prompt_width),
            flat(expected, 26),
            flat(row.before.strip(), width),
            flat(row.after.strip(), width),
            row.mark,
        ))
    widths = [max(len(h), *(len(l[c]) for l in lines)) for c, h in enumerate(headers)]
    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [fmt(headers), fmt(["-" * w for w in widths])]
    for i, l in enumerate(lines):
        if l[0] and i:
            out.append("")
        out.append(fmt(l))
    return "\n".join(out)


def edit_summary(table: Table) -> str:
    """One line: how many edits and rephrasings were taken, how many controls stayed unchanged."""
    edits, reph, ctrl = table.of("edit"), table.of("rephrase"), table.of("control")
    n_taken = sum(taken(r.after, r.expected) for r in edits)
    n_before = sum(taken(r.before, r.expected) for r in edits)
    parts = [f"edits taken: {n_taken}/{len(edits)} (answer starts with the new target; {n_before}/{len(edits)} before)"]
    if reph:
        parts.append(f"rephrases taken: {sum(taken(r.after, r.expected) for r in reph)}/{len(reph)}")
    if ctrl:
        parts.append(f"controls unchanged: {sum(r.after == r.before for r in ctrl)}/{len(ctrl)}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- `comeba eval`: pre and post


def format_summary(summary: dict) -> str:
    """A run's pre/post metrics as a text table, then its checkpoints (when there are several)."""
    pre, post = summary.get("pre") or {}, summary.get("post") or {}
    keys = [k for k in pre if k in post] + [k for k in post if k not in pre]
    rows = [("metric", "pre", "post")]
    for k in keys:
        unit = " (bits)" if k == "fluency" else ""
        rows.append((k.replace("_", " ") + unit,
                     "-" if pre.get(k) is None else f"{pre[k]:.1f}",
                     "-" if post.get(k) is None else f"{post[k]:.1f}"))
    w0 = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{w0}}  {r[1]:>7}  {r[2]:>7}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    warned = summary.get("warned")
    if warned:
        n = len(warned["records"])
        lines.append("")
        lines.append(f"{n} of {summary['n_edits']} requests were warned about (they will probably not take): "
                     f"reliability / generality / locality {format_core(warned['post'])} on them, "
                     f"{format_core(warned['post_others'])} on the others")
    cps = summary.get("checkpoints") or []
    if len(cps) > 1:
        lines.append("")
        lines.append("checkpoints (edits: reliability / generality / locality)")
        for c in cps:
            lines.append(f"  {c['n_edits']:>6}: {format_core(c)}")
    return "\n".join(lines)


def format_core(means: Mapping[str, Any]) -> str:
    """Reliability / generality / locality, one decimal each ("-" where missing)."""
    return " / ".join("-" if means.get(k) is None else f"{means[k]:.1f}" for k in ("reliability", "generality", "locality"))


def format_times(summary: Mapping[str, Any]) -> str:
    """One line: wall time, editing and evaluation time, peak memory."""
    return (f"time {summary['seconds']:.1f} s (editing {summary['edit_seconds']:.1f} s, "
            f"{summary['seconds_per_edit']:.2f} s per edit; evaluation {summary['eval_seconds']:.1f} s); "
            f"peak RSS {summary['peak_rss_mb']:.0f} MB"
            + (f", peak GPU memory {summary['peak_gpu_mb']:.0f} MB" if summary.get("peak_gpu_mb") is not None else ""))


# ----------------------------------------------------------------------------- a run folder's CSV and plot


def checkpoints_csv(checkpoints: Sequence[Mapping[str, Any]]) -> str:
    """The checkpoints as CSV text, one column per key in order of appearance (empty for None)."""
    columns: list[str] = []
    for c in checkpoints:
        columns += [k for k in c if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for c in checkpoints:
        writer.writerow({k: ("" if c.get(k) is None else c.get(k)) for k in columns})
    return buf.getvalue()


PLOT_STYLE = {
    "reliability": ("tab:blue", "-"), "generality": ("tab:orange", "-"), "locality": ("tab:green", "-"),
    "efficacy_score": ("tab:blue", "--"), "paraphrase_score": ("tab:orange", "--"),
    "neighborhood_score": ("tab:green", "--"),
}


def plot_checkpoints(summary: Mapping[str, Any], path: Path) -> None:
    """The teacher-forced metrics against the number of edits; pre-edit values as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cps = summary["checkpoints"]
    gate_keys = sorted({k for c in cps for k in c if k.startswith("false_open_") and k != "false_open_max"},
                       key=lambda k: int(k.rsplit("_", 1)[1]))
    has_ppl = any(c.get("perplexity_ratio") is not None for c in cps)
    if gate_keys or has_ppl:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    xs = [c["n_edits"] for c in cps]
    for key, (color, style) in PLOT_STYLE.items():
        ys = [c.get(key) for c in cps]
        if not any(y is not None for y in ys):
            continue
        ax.plot(xs, [math.nan if y is None else y for y in ys], style, color=color, marker="o", ms=3,
                label=key.replace("_", " "))
        pre = (summary.get("pre") or {}).get(key)
        if pre is not None and key != "locality":
            ax.axhline(pre, color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("number of edits" + (" (evaluated so far)" if summary["protocol"] == "single" else ""))
    ax.set_ylabel("percent")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{summary['method']} · {summary['protocol']} · batch {summary['batch_size']}"
                 f" · {summary['n_edits']} edits (dotted: before editing)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    if gate_keys or has_ppl:
        for i, key in enumerate(gate_keys):
            ax2.plot(xs, [c.get(key, math.nan) for c in cps], marker="o", ms=3, color=f"C{i}",
                     label=f"false-open, layer {key.rsplit('_', 1)[1]}")
        ax2.set_xlabel("number of edits")
        ax2.set_ylabel("gate opens on general text (% of tokens)")
        ax2.set_ylim(bottom=0)
        ax2.grid(alpha=0.3)
        if has_ppl:
            ax3 = ax2.twinx()
            ax3.plot(xs, [c.get("perplexity_ratio", math.nan) for c in cps], "k--", marker="s", ms=3,
                     label="perplexity ratio (right)")
            ax3.set_ylabel("perplexity with hooks / unedited")
            ax3.ticklabel_format(axis="y", useOffset=False)
            lines = ax2.get_legend_handles_labels()
            more = ax3.get_legend_handles_labels()
            ax2.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
        else:
            ax2.legend(fontsize=7, loc="upper left")
        ax2.set_title("gate diagnostics (general text not used for the statistics)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)


def format_plan(plan: "Plan") -> str:
    """A memory plan (comeba.plan) as a small table, then its notes on float64."""
    from .plan import human

    shape, hp, first = plan.shape, plan.hparams, plan.layers[0]
    rows = [("model weights", plan.weights, f"{shape.n_params / 1e9:.3g} B parameters, {plan.dtype}"),
            ("editor state, per layer", first.total,
             f"inference {human(first.inference)} (ΔW {human(first.delta)}"
             + (f", gate {human(first.gate)}" if first.gate else "") + f"), editing {human(first.editing)} "
             f"(C_accu {human(first.c_accu)}" + (f", C0 {human(first.c0)}" if first.c0 else "") + ")"),
            (f"editor state, {len(plan.layers)} layers", plan.state,
             f"inference {human(plan.state_inference)}, editing {human(plan.state_editing)}")]
    for phase in plan.phases.values():
        rows.append((f"peak: {phase.what}", phase.peak, " + ".join(phase.base) + " + "
                     + ", ".join(f"{k} {human(v)}" for k, v in phase.parts.items())))
    rows.append(("total: the largest peak", plan.peak, plan.worst().what))
    if plan.device_bytes is not None:
        rows.append(("device", plan.device_bytes, plan.verdict(plan.device_bytes)))
    head = (f"{shape.name}: {shape.layout} layout, {shape.n_layers} layers, hidden {shape.hidden}, MLP {first.d_in}, "
            f"vocabulary {shape.vocab}; layers {list(hp.layers)}, {hp.gate} gate, mom2_dtype {hp.mom2_dtype}, "
            f"batch {plan.batch_size}")
    table = ["| part | size | of which |", "| --- | ---: | --- |"]
    table += [f"| {name} | {human(size)} | {what} |" for name, size, what in rows]
    return "\n".join([head, "", *table, "", *(f"- {note}" for note in plan.notes)])
