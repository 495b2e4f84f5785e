"""Does a faster target-value optimisation keep the quality? The dev consecutive cells with each optimiser
and each precision (hparams `v_optimizer`, `v_dtype`).

    python benchmarks/optimizer_quality.py                       # CounterFact and zsRE, lbfgs then adam
    python benchmarks/optimizer_quality.py --datasets counterfact --optimizers lbfgs
    python benchmarks/optimizer_quality.py --optimizers lbfgs --v-dtypes float32 bfloat16 --jobs 2 \
        --out-dir benchmarks/results/speed/precision          # bfloat16 against float32, two cells at a time
    python benchmarks/optimizer_quality.py --optimizers lbfgs --v-dtypes bfloat16 --jobs 2 \
        --variant 'prefixes2:context_template_prefixes=["The", "Therefore"]' \
        --out-dir benchmarks/results/speed/templates           # fewer context templates, against the default
    python benchmarks/optimizer_quality.py --report-only

The same cells as benchmarks/run_table.py's consecutive comeba cells (dev
records 0..199, batches of 20, WikiText-2 statistics, span gate, gate
diagnostics), run with `v_optimizer: lbfgs` (the default) and `v_optimizer:
adam` (the reference schedule) of this commit, and with each `--v-dtypes`
setting (float32 cells are OUT/<dataset>-<optimizer>/, others
OUT/<dataset>-<optimizer>-<dtype>/), each one a resumable ``comeba eval`` run.
With --jobs 2 two cells run at once, one thread each (side by side, so their
seconds compare). Writes OUT/OPTIMIZER.md: reliability,
generality, locality, false-open and seconds per edit side by side, and the
differences (the issue asks for all three within 1 point). OUT is
benchmarks/results/speed by default.
"""

from __future__ import annotations

import argparse
import json
import os
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
    p.add_argument("--v-dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32"])
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (each then gets 2 // jobs threads)")
    p.add_argument("--threads", type=int, help="threads per cell (default 2 // jobs)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "speed"))
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[;KEY=VALUE]",
                   help="also run each cell with these hparams (YAML values), as cell <cell>-NAME")
    p.add_argument("--only-variants", action="store_true", help="run only the --variant cells, not the default ones")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    args.variants = {} if args.only_variants else {"": {}}
    for spec in args.variant:
        name, _, body = spec.partition(":")
        if not name or not body or not name.replace("-", "").replace("_", "").isalnum():
            p.error(f"--variant {spec!r}: expected NAME:KEY=VALUE[;KEY=VALUE]")
        args.variants[name] = dict(item.split("=", 1) for item in body.split(";"))
    return args


def cell_name(dataset: str, optimizer: str, dtype: str, variant: str = "") -> str:
    return f"{dataset}-{optimizer}" + ("" if dtype == "float32" else f"-{dtype}") + (f"-{variant}" if variant else "")


def variant_of(name: str) -> str:
    """The variant part of a cell's name ('' for none): what follows dataset, optimiser and v_dtype."""
    parts = name.split("-")
    rest = parts[2:] if len(parts) > 2 else []
    if rest and rest[0] in ("float32", "bfloat16"):
        rest = rest[1:]
    return "-".join(rest)


def start_cell(args, dataset: str, optimizer: str, dtype: str, variant: str, out: Path
               ) -> tuple[str, subprocess.Popen] | None:
    """Start one cell's `comeba eval` (None when it is done already)."""
    folder = out / cell_name(dataset, optimizer, dtype, variant)
    if (folder / "summary.json").exists():
        print(f"{folder.name}: done", flush=True)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    extra = "".join(f"{k}: {v}\n" for k, v in args.variants[variant].items())
    (folder.parent / f"{folder.name}.yaml").write_text(f"v_optimizer: {optimizer}\nv_dtype: {dtype}\n{extra}")
    cmd = [sys.executable, "-m", "comeba", "eval", "--method", "comeba", "--protocol", "consecutive",
           "--data", f"{dataset}:{DATA / DATASETS[dataset]}", "--n", str(args.n), "--batch-size", "20",
           "--checkpoint-every", "5", "--pre-cache", str(ROOT / "benchmarks" / "results" / "table" / "runs" / f"{dataset}-pre.json"),
           "--stats-text", str(DATA / "wikitext-2" / "valid.txt"), "--stats-tokens", "100000", "--gate", "span",
           "--diagnostics-text", str(DATA / "wikitext-2" / "test.txt"),
           "--hparams", str(folder.parent / f"{folder.name}.yaml"), "--out", str(folder)]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import git_commit

    threads = args.threads or max(1, 2 // args.jobs)
    (folder.parent / f"{folder.name}.json").write_text(json.dumps({"command": cmd, "commit": git_commit(),
                                                                    "threads": threads, "jobs": args.jobs}, indent=1))
    print(f"{folder.name}: {' '.join(cmd)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(folder.parent / f"{folder.name}.log", "a") as log:  # the child keeps its own descriptor
        return folder.name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_cells(args, out: Path) -> None:
    """Every cell, --jobs at a time."""
    todo = [(d, o, t, v) for d in args.datasets for o in args.optimizers for t in args.v_dtypes for v in args.variants]
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    while todo or running:
        while todo and len(running) < args.jobs:
            started = start_cell(args, *todo.pop(0), out)
            if started:
                running.append(started)
        if not running:
            continue
        name, proc = running.pop(0)
        code = proc.wait()
        if code != 0:
            failed.append(f"{name} (exit {code}; see {out / (name + '.log')})")
    if failed:
        sys.exit("failed: " + ", ".join(failed))


def report(args, out: Path) -> None:
    lines = ["# Target-value optimisers: quality and speed (dev consecutive cells, 200 edits, batches of 20)", "",
             "Written by `python benchmarks/optimizer_quality.py`. Embedded SmolLM2-135M, WikiText-2 statistics,",
             "span gate; reliability / generality / locality after all 200 edits; seconds per edit include the",
             "gate calibration, not the evaluation. These cells ran beside other jobs on the 2 cores, so their",
             "seconds are not speed figures: those are in benchmarks/results/profile/profile.json (one run, side by side).", "",
             "| dataset | optimiser | v_dtype | variant | reliability | generality | locality | false-open % | ppl ratio "
             "| s/edit | threads | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    results: dict = {}
    variants = sorted({variant_of(p.stem) for p in out.glob("*.yaml")})
    for dataset in DATASETS:
        for opt in ("lbfgs", "adam"):
            for dtype in ("float32", "bfloat16"):
                for variant in variants:
                    name = cell_name(dataset, opt, dtype, variant)
                    path = out / name / "summary.json"
                    if not path.exists():
                        continue
                    s = json.loads(path.read_text())
                    last = s["checkpoints"][-1]
                    meta = json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").exists() else {}
                    results[(dataset, opt, dtype, variant)] = last
                    lines.append(f"| {dataset} | {opt} | {dtype} | {variant or '—'} | {last['reliability']:.1f} | "
                                 f"{last['generality']:.1f} | "
                                 f"{last['locality']:.1f} | {last.get('false_open_max', float('nan')):.2f} | "
                                 f"{last.get('perplexity_ratio', float('nan')):.4f} | {s['seconds_per_edit']:.2f} | "
                                 f"{meta.get('threads', 2)} | {meta.get('commit', '')[:7]} |")
    lines.append("")
    for dataset in DATASETS:
        pairs = [(("lbfgs", "float32", ""), ("adam", "float32", ""), "lbfgs − adam"),
                 (("lbfgs", "bfloat16", ""), ("lbfgs", "float32", ""), "bfloat16 − float32 (lbfgs)")]
        pairs += [((o, t, v), (o, t, ""), f"{v} − default ({o}, {t})")
                  for v in variants if v for o in ("lbfgs", "adam") for t in ("float32", "bfloat16")]
        pairs += [(("lbfgs", "bfloat16", v), ("lbfgs", "float32", ""), f"{v} in bfloat16 − default (lbfgs, float32)")
                  for v in variants if v]
        pairs += [(("lbfgs", "bfloat16", ""), ("adam", "float32", v), f"lbfgs, bfloat16 − adam, float32, {v}")
                  for v in variants if v]
        for a_key, b_key, label in pairs:
            if (dataset, *a_key) in results and (dataset, *b_key) in results:
                a, b = results[(dataset, *a_key)], results[(dataset, *b_key)]
                diffs = ", ".join(f"{m} {a[m] - b[m]:+.1f}" for m in ("reliability", "generality", "locality"))
                lines.append(f"- {dataset}: {label}: {diffs}")
    if (not any(key[:2] == ("zsre", "adam") for key in results) and ("zsre", "lbfgs", "float32", "") in results
            and any(key[1] == "adam" for key in results) and (ROOT / "benchmarks" / "results" / "table" / "runs" / "zsre-consecutive-comeba"
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
        run_cells(args, out)
    report(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
