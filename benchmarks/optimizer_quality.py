"""Does the faster target-value optimiser keep the quality? The dev consecutive cells with each optimiser.

    python benchmarks/optimizer_quality.py                       # CounterFact and zsRE, lbfgs then adam
    python benchmarks/optimizer_quality.py --datasets counterfact --optimizers lbfgs
    python benchmarks/optimizer_quality.py --report-only

The same cells as benchmarks/run_table.py's consecutive comeba cells (dev
records 0..199, batches of 20, WikiText-2 statistics, span gate, gate
diagnostics), run with `v_optimizer: lbfgs` (the default) and `v_optimizer:
adam` (the reference schedule) of this commit, each one resumable ``comeba
eval`` run in OUT/<dataset>-<optimizer>/. Writes OUT/OPTIMIZER.md: reliability,
generality, locality, false-open and seconds per edit side by side, and the
differences (the issue asks for all three within 1 point). OUT is
benchmarks/results/speed by default.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DATASETS = {"counterfact": "counterfact/counterfact-dev.json", "zsre": "zsre/zsre-dev.json"}
METRICS = ("reliability", "generality", "locality", "false_open_max", "perplexity_ratio")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", choices=tuple(DATASETS), default=list(DATASETS))
    p.add_argument("--optimizers", nargs="+", choices=("lbfgs", "adam"), default=["lbfgs", "adam"])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "speed"))
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def run_cell(args, dataset: str, optimizer: str, out: Path) -> None:
    folder = out / f"{dataset}-{optimizer}"
    if (folder / "summary.json").exists():
        print(f"{folder.name}: done", flush=True)
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder.parent / f"{folder.name}.yaml").write_text(f"v_optimizer: {optimizer}\n")
    cmd = ["comeba", "eval", "--method", "comeba", "--protocol", "consecutive",
           "--data", f"{dataset}:{DATA / DATASETS[dataset]}", "--n", str(args.n), "--batch-size", "20",
           "--checkpoint-every", "5", "--pre-cache", str(ROOT / "benchmarks" / "results" / "table" / "runs" / f"{dataset}-pre.json"),
           "--stats-text", str(DATA / "wikitext-2" / "valid.txt"), "--stats-tokens", "100000", "--gate", "span",
           "--diagnostics-text", str(DATA / "wikitext-2" / "test.txt"),
           "--hparams", str(folder.parent / f"{folder.name}.yaml"), "--out", str(folder)]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import git_commit

    (folder.parent / f"{folder.name}.json").write_text(json.dumps({"command": cmd, "commit": git_commit()}, indent=1))
    print(f"{folder.name}: {' '.join(cmd)}", flush=True)
    with open(folder.parent / f"{folder.name}.log", "a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{folder.name} failed (exit {code}); see {folder.parent / (folder.name + '.log')}")


def report(args, out: Path) -> None:
    lines = ["# Target-value optimisers: quality and speed (dev consecutive cells, 200 edits, batches of 20)", "",
             "Written by `python benchmarks/optimizer_quality.py`. Embedded SmolLM2-135M, WikiText-2 statistics,",
             "span gate; reliability / generality / locality after all 200 edits; seconds per edit include the",
             "gate calibration, not the evaluation. These cells ran beside other jobs on the 2 cores, so their",
             "seconds are not speed figures: those are in benchmarks/results/profile/profile.json (one run, side by side).", "",
             "| dataset | optimiser | reliability | generality | locality | false-open % | ppl ratio | s/edit | commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    results: dict = {}
    for dataset in DATASETS:
        for opt in ("lbfgs", "adam"):
            path = out / f"{dataset}-{opt}" / "summary.json"
            if not path.exists():
                continue
            s = json.loads(path.read_text())
            last = s["checkpoints"][-1]
            meta = out / f"{dataset}-{opt}.json"
            commit = json.loads(meta.read_text()).get("commit", "")[:7] if meta.exists() else ""
            results[(dataset, opt)] = last
            lines.append(f"| {dataset} | {opt} | {last['reliability']:.1f} | {last['generality']:.1f} | "
                         f"{last['locality']:.1f} | {last.get('false_open_max', float('nan')):.2f} | "
                         f"{last.get('perplexity_ratio', float('nan')):.4f} | {s['seconds_per_edit']:.2f} | {commit} |")
    lines.append("")
    for dataset in DATASETS:
        if (dataset, "lbfgs") in results and (dataset, "adam") in results:
            a, b = results[(dataset, "lbfgs")], results[(dataset, "adam")]
            diffs = ", ".join(f"{m} {a[m] - b[m]:+.1f}" for m in ("reliability", "generality", "locality"))
            lines.append(f"- {dataset}: lbfgs − adam: {diffs}")
    if (("zsre", "adam") not in results and (ROOT / "benchmarks" / "results" / "table" / "runs" / "zsre-consecutive-comeba"
                                              / "summary.json").exists()):
        cell = json.loads((ROOT / "benchmarks" / "results" / "table" / "runs" / "zsre-consecutive-comeba" / "summary.json").read_text())
        last = cell["checkpoints"][-1]
        lines.append(f"- zsre adam was not run at this commit; the table's cell (benchmarks/results/table/runs/zsre-consecutive-comeba, "
                     f"the same optimiser, before the speed work) has {last['reliability']:.1f} / "
                     f"{last['generality']:.1f} / {last['locality']:.1f}")
    (out / "OPTIMIZER.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for dataset in args.datasets:
            for opt in args.optimizers:
                run_cell(args, dataset, opt, out)
    report(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
