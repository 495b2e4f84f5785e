"""Thousands of consecutive edits: quality and the gate against the number of edits, all methods on one figure.

    python benchmarks/scale.py                                  # 1,000 edits (50 × 20), four methods
    python benchmarks/scale.py --methods comeba --n 10000 --batch-size 100 --checkpoint-every 10   # 10,000
    python benchmarks/scale.py --report-only                    # redraw the figure and SCALE.md

Each method is one resumable ``comeba eval`` run (consecutive protocol) on
``counterfact-scale.json`` records 0..n-1 (none of them in counterfact-dev.json),
with WikiText-2 statistics and the gate diagnostics on WikiText-2 test text,
evaluated over all edits so far every --checkpoint-every batches. Methods:
``comeba`` (the span gate, the default), ``comeba-reference`` (the authors'
z-score gate), ``seq-memit`` and ``alphaedit``; and, when asked for, ``seq-memit-adam32``
and ``alphaedit-adam32``: the same two with the reference optimiser (Adam, float32); ``comeba-skips-no-context``:
comeba with ``gate_open_no_context: false`` (the default since its run; kept so that run reproduces). Interrupt it any time and run
the same command again: finished runs are skipped, an interrupted one resumes
from its last checkpoint. Writes OUT/<n>/<method>/ (the runs), OUT/<n>/scale.png
and OUT/<n>/SCALE.md (OUT: benchmarks/results/scale by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from comeba.reporting import format_core

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# The baselines were tuned with the reference optimiser; at the default (L-BFGS) they write larger updates
# and lose more (README, Editing quality), so they can also run with it (opt-in, --methods).
REFERENCE_OPTIMISER = ROOT / "benchmarks" / "hparams" / "reference-optimiser.yaml"
# comeba with `gate_open_no_context: false`, written out (the default since this run measured it; --methods).
SKIPS_NO_CONTEXT = ROOT / "benchmarks" / "hparams" / "gate-skips-no-context.yaml"
METHODS = {  # name -> comeba eval options
    "comeba": ["--method", "comeba", "--gate", "span"],
    "comeba-reference": ["--method", "comeba", "--gate", "reference"],
    "seq-memit": ["--method", "seq-memit"],
    "alphaedit": ["--method", "alphaedit"],
    "seq-memit-adam32": ["--method", "seq-memit", "--hparams", str(REFERENCE_OPTIMISER)],
    "alphaedit-adam32": ["--method", "alphaedit", "--hparams", str(REFERENCE_OPTIMISER)],
    "comeba-skips-no-context": ["--method", "comeba", "--gate", "span", "--hparams", str(SKIPS_NO_CONTEXT)],
}
DEFAULT_METHODS = ("comeba", "comeba-reference", "seq-memit", "alphaedit")
SO_FAR = "checkpoints-so-far.json"  # an unfinished run's checkpoints, written by --report-only
PANELS = (("reliability", "reliability %"), ("generality", "generality %"), ("locality", "locality %"),
          ("false_open_max", "false-open % (worst layer)"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="records 0..n-1 of counterfact-scale.json (default 1000)")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--checkpoint-every", type=int, default=5, help="batches between evaluations (default 5)")
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(DEFAULT_METHODS),
                   help="default: the four of the issue; seq-memit-adam32 and alphaedit-adam32 are those two "
                        "with the reference optimiser (benchmarks/hparams/reference-optimiser.yaml)")
    p.add_argument("--stats-tokens", type=int, default=100_000)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "scale"))
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def command(args, method: str, folder: Path) -> list[str]:
    return ["comeba", "eval", *METHODS[method], "--protocol", "consecutive",
            "--data", f"counterfact:{DATA / 'counterfact' / 'counterfact-scale.json'}", "--n", str(args.n),
            "--batch-size", str(args.batch_size), "--checkpoint-every", str(args.checkpoint_every),
            "--stats-text", str(DATA / "wikitext-2" / "valid.txt"), "--stats-tokens", str(args.stats_tokens),
            "--diagnostics-text", str(DATA / "wikitext-2" / "test.txt"), "--no-generation", "--fluency-tokens", "0",
            "--pre-cache", str(folder.parent / "pre.json"), "--device", args.device, "--out", str(folder)]


def _summary(folder: Path) -> dict | None:
    """A run's summary.json, or for a run still going (or stopped) its checkpoints so far from progress.json."""
    if (folder / "summary.json").is_file():
        return json.loads((folder / "summary.json").read_text())
    # progress.json is the resume file (not committed); SO_FAR keeps its checkpoints beside the committed files
    source = next((folder / f for f in ("progress.json", SO_FAR) if (folder / f).is_file()), None)
    if source is None or not (folder / "run.json").is_file():
        return None
    prog, run = json.loads(source.read_text()), json.loads((folder / "run.json").read_text())
    cps = prog.get("checkpoints") or []
    if not cps:
        return None
    if source.name != SO_FAR:
        (folder / SO_FAR).write_text(json.dumps({k: prog[k] for k in ("checkpoints", "edit_seconds", "seconds")},
                                                indent=1) + "\n")
    n = cps[-1]["n_edits"]
    return {"checkpoints": cps, "n_edits": n, "post": cps[-1], "batch_size": run["batch_size"],
            "seconds_per_edit": prog["edit_seconds"] / n, "seconds": prog["seconds"], "unfinished": True}


def _warned_file(folder: Path) -> dict | None:
    """benchmarks/warned.py's split of a run from before `comeba eval` recorded the warnings itself."""
    path = folder / "warned.json"
    return json.loads(path.read_text()) if path.is_file() else None


def report(out: Path, methods: list[str]) -> None:
    summaries = {}
    for m in methods:
        summary = _summary(out / m)
        if summary is not None:
            summaries[m] = summary
    if not summaries:
        print("[scale] no finished run to report")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 3.6), dpi=110)
    for ax, (key, title) in zip(axes, PANELS):
        for k, (m, s) in enumerate(summaries.items()):
            cps = s["checkpoints"]
            ax.plot([c["n_edits"] for c in cps], [c.get(key, float("nan")) for c in cps], marker="osD^"[k % 4],
                    ms=4, color=f"C{k}", label=m + (" (unfinished)" if s.get("unfinished") else ""))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edits so far")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    s0 = next(iter(summaries.values()))
    n_all = max(s["n_edits"] for s in summaries.values())
    fig.suptitle(f"CounterFact scale records, consecutive batches of {s0['batch_size']}, "
                 f"up to {n_all} edits, embedded SmolLM2-135M", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "scale.png")
    plt.close(fig)
    lines = [f"# {n_all} consecutive edits (counterfact-scale.json records 0..{n_all - 1})", "",
             "| method | edits | reliability | generality | locality | false-open % (worst layer, worst checkpoint) "
             "| perplexity ratio | s / edit | hours |", "|" + " --- |" * 9]
    for m, s in summaries.items():
        post, cps = s["post"], s["checkpoints"]
        m = f"{m} (unfinished)" if s.get("unfinished") else m
        fo = [c["false_open_max"] for c in cps if c.get("false_open_max") is not None]
        lines.append(f"| {m} | {s['n_edits']} | {post['reliability']:.1f} | {post['generality']:.1f} | "
                     f"{post['locality']:.1f} | {max(fo):.2f} | " if fo else
                     f"| {m} | {s['n_edits']} | {post['reliability']:.1f} | {post['generality']:.1f} | "
                     f"{post['locality']:.1f} | — | ")
        lines[-1] += f"{cps[-1].get('perplexity_ratio', float('nan')):.4f} | {s['seconds_per_edit']:.2f} | " \
                     f"{s['seconds'] / 3600:.2f} |"
    lines += ["", f"Plot: scale.png. Runs: {', '.join(summaries)} (each folder's summary.json and checkpoints.csv)."]
    for m, s in summaries.items():
        w = s.get("warned") or _warned_file(out / m)
        if w:
            lines.append(f"{m}: {len(w['records'])} of {s['n_edits']} records are ones `comeba edit` warns will "
                         f"probably not take (a subject without context; records {', '.join(map(str, w['records']))}): "
                         f"reliability / generality / locality {format_core(w['post'])} on them, {format_core(w['post_others'])} "
                         "on the others (summary.json's `warned`, or warned.json from benchmarks/warned.py).")
    if any(m.endswith("-adam32") for m in summaries):
        lines.append("A name ending in -adam32: that method with the reference optimiser (Adam, float32; "
                     "benchmarks/hparams/reference-optimiser.yaml), the others at the defaults.")
    (out / "SCALE.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out_dir) / str(args.n)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        for m in args.methods:
            if (out / m / "summary.json").is_file():
                print(f"[scale] {m}: finished, skipped")
                continue
            cmd = command(args, m, out / m)
            print(f"[scale] {m}: {shlex.join(cmd)}", flush=True)
            rc = subprocess.call([sys.executable, "-m", "comeba", *cmd[1:]], cwd=ROOT, env=env)
            if rc != 0:
                print(f"[scale] {m} failed (exit {rc}); run the same command again to resume", file=sys.stderr)
                return rc
    report(out, [m for m in METHODS if m in args.methods or (out / m).is_dir()])  # every run in OUT: one figure
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
