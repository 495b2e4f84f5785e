"""Where the seconds of a consecutive batch go, and today's path against a baseline commit in the same run.

    python benchmarks/profile_edit.py                          # batch 1, 20 and 100; baseline commit 476e63e at 20
    python benchmarks/profile_edit.py --batch-sizes 20 --baseline none --out /tmp/p.json   # quick look
    python benchmarks/profile_edit.py --device cuda --batch-sizes 20 100 --batches 3      # on a GPU

For each batch size, a fresh editor (embedded model, WikiText-2 statistics,
span gate) writes --batches consecutive batches of CounterFact dev records
and every phase of `Editor.edit` is timed: the prefix pass of the target
values (the whole rewriting prompts once, filling the KV cache), the
optimisation passes (forward + vocabulary head, backward; and how many
passes each request needed), writing the layers (keys, solves, span gates),
the gate's calibration, and the rest. --optimizer-adam adds a run of the
reference optimiser (`v_optimizer: adam`) of this commit. --baseline COMMIT
times the same batches with the code of an earlier commit (extracted with
`git archive` into a temporary folder and imported from there, in a
subprocess), so the speed-up is a ratio measured in one run on one machine.
Writes --out (default benchmarks/results/profile/profile.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BASELINE = "476e63e"  # the last commit before the speed work (issue 13)
# the timed gate calibration: a method of the editor in earlier layouts, a function the editor module imports since
CALIBRATION = ("Editor._calibrate", "comeba.editor.calibrate_span")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 20, 100])
    p.add_argument("--batches", type=int, default=2, help="consecutive batches per size (default 2)")
    p.add_argument("--baseline", default=BASELINE, help=f"commit to compare with at --baseline-size (default {BASELINE}; 'none' skips)")
    p.add_argument("--baseline-size", type=int, default=20)
    p.add_argument("--optimizer-adam", action="store_true", help="also time v_optimizer: adam at --baseline-size")
    p.add_argument("--v-dtypes", nargs="+", default=[], metavar="DTYPE",
                   help="also time this commit at --baseline-size with each of these v_dtype settings (float32, bfloat16)")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="a hyperparameter for every run of this commit (YAML value; repeatable)")
    p.add_argument("--counterfact", default=str(DATA / "counterfact" / "counterfact-dev.json"))
    p.add_argument("--stats-text", default=str(DATA / "wikitext-2" / "valid.txt"))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile" / "profile.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON job for a subprocess
    return p.parse_args(argv)


# --------------------------------------------------------------------------- one measurement (in a subprocess)


def _timer(into: dict, key: str, fn):
    def inner(*a, **k):
        start = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            into[key] = into.get(key, 0.0) + time.perf_counter() - start
    return inner


def worker(job: dict) -> dict:
    """Time `batches` consecutive batches of `size` edits with the comeba found on sys.path."""
    import torch

    torch.set_num_threads(job["threads"])
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import comeba.editor as editor_mod
    from comeba.data import load_counterfact
    from comeba.editor import Editor
    from comeba.hparams import HParams
    from comeba.models import load_model
    try:
        from comeba.corpus import text_corpus
    except ImportError:  # earlier layouts (the baseline commit) kept it in comeba.stats
        from comeba.stats import text_corpus

    model, tokenizer = load_model("embedded", device=job["device"])
    hp = HParams(**job.get("hparams", {}))
    size, batches = job["size"], job["batches"]
    requests = load_counterfact(job["counterfact"], offset=0, n=size * batches).requests
    make = getattr(Editor, "create", Editor)  # earlier layouts (the baseline commit) built a fresh editor with create
    editor = make(model, tokenizer, hp, corpus=text_corpus([job["stats_text"]]), progress=False)
    phases: dict = {}
    passes: list[int] = []
    patches = [(editor_mod, "target_values"), (editor_mod, "write_layers")]
    patches.append((Editor, "_calibrate") if hasattr(Editor, "_calibrate") else (editor_mod, "calibrate_span"))
    try:  # the finer phases exist only in the new layout
        import comeba.values as values_mod

        objective = values_mod._Objective
        patches += [(objective, "__init__"), (objective, "__call__"), (objective, "value_and_grad")]
        for name, fn in list(values_mod.OPTIMISERS.items()):
            def counted(obj, hp_, fn=fn):
                delta, loss, n_passes = fn(obj, hp_)
                passes.extend(int(p) for p in n_passes.tolist())
                return delta, loss, n_passes
            values_mod.OPTIMISERS[name] = counted
    except ImportError:
        pass
    for owner, name in patches:
        setattr(owner, name, _timer(phases, f"{getattr(owner, '__name__', owner)}.{name}", getattr(owner, name)))
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    per_batch = []
    for b in range(batches):
        phases.clear()
        passes.clear()
        sync()
        start = time.perf_counter()
        editor.edit(requests[b * size : (b + 1) * size])
        sync()
        total = time.perf_counter() - start
        per_batch.append({"seconds": total, "phases": dict(phases), "passes": list(passes)})
    peak = torch.cuda.max_memory_allocated() if model.device.type == "cuda" else None
    return {"per_batch": per_batch, "peak_cuda_bytes": peak}


# --------------------------------------------------------------------------- driver


def run_worker(job: dict, src: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(job["threads"]))
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        sys.exit(f"profile_edit: a measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(result: dict, size: int) -> dict:
    """Mean seconds per edit over the batches, and each phase's share (new layout names)."""
    rows = result["per_batch"]
    total = sum(r["seconds"] for r in rows)
    ph: dict = {}
    for r in rows:
        for k, v in r["phases"].items():
            ph[k] = ph.get(k, 0.0) + v
    names = {
        "_Objective.__init__": "prefix pass", "_Objective.__call__": "optimisation: forward + head",
        "comeba.editor.write_layers": "write layers", **{key: "gate calibration" for key in CALIBRATION},
    }
    out = {"s_per_edit": total / (size * len(rows)), "batches_s": [round(r["seconds"], 3) for r in rows]}
    phases = {}
    for key, label in names.items():
        if key in ph:
            phases[label] = ph[key]
    if "_Objective.value_and_grad" in ph:
        phases["optimisation: backward + steps"] = ph["_Objective.value_and_grad"] - ph.get("_Objective.__call__", 0)
        phases["optimisation: step logic"] = (ph.get("comeba.editor.target_values", 0) - ph["_Objective.value_and_grad"]
                                              - ph.get("_Objective.__init__", 0))
    elif "comeba.editor.target_values" in ph:
        phases["target values"] = ph["comeba.editor.target_values"]
    phases["other (state, span gates, α)"] = total - sum(
        ph.get(k, 0) for k in ("comeba.editor.target_values", "comeba.editor.write_layers", *CALIBRATION))
    out["phases_s_per_edit"] = {k: round(v / (size * len(rows)), 4) for k, v in phases.items()}
    passes = [p for r in rows for p in r["passes"]]
    if passes:
        out["passes_per_request"] = {"mean": round(sum(passes) / len(passes), 2), "max": max(passes)}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import cpu_model, git_commit

    for path in (args.counterfact, args.stats_text):
        if not Path(path).is_file():
            sys.exit(f"profile_edit: {path} does not exist (the shared benchmark data sits beside the repository)")
    base = {"counterfact": args.counterfact, "stats_text": args.stats_text, "device": args.device,
            "threads": args.threads, "batches": args.batches}
    load = os.getloadavg()[0]
    report: dict = {"benchmark": "profile_edit", "commit": git_commit(), "cpu": cpu_model(), "threads": args.threads,
                    "device": args.device, "load_average_1min_at_start": load, "batches": args.batches,
                    "records": "counterfact dev 0.., consecutive", "this_commit": {}}
    import yaml

    overrides = {}
    for item in args.hparam:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"profile_edit: --hparam {item!r} is not KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    report["hparams"] = overrides
    src = ROOT / "src"

    def save() -> None:  # after every measurement: a later failure keeps the earlier ones
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    for size in args.batch_sizes:
        print(f"this commit, batch {size} ...", flush=True)
        report["this_commit"][str(size)] = summarise(run_worker(dict(base, size=size, hparams=overrides), src), size)
        save()
    for dtype in args.v_dtypes:
        print(f"this commit with v_dtype {dtype}, batch {args.baseline_size} ...", flush=True)
        report[f"this_commit_{dtype}"] = summarise(
            run_worker(dict(base, size=args.baseline_size, hparams={**overrides, "v_dtype": dtype}), src),
            args.baseline_size)
        save()
    if args.optimizer_adam:
        print(f"this commit with v_optimizer adam, batch {args.baseline_size} ...", flush=True)
        report["this_commit_adam"] = summarise(
            run_worker(dict(base, size=args.baseline_size, hparams={**overrides, "v_optimizer": "adam"}), src),
            args.baseline_size)
        save()
    if args.baseline != "none":
        print(f"baseline {args.baseline}, batch {args.baseline_size} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="comeba-baseline-") as tmp:
            archive = Path(tmp) / "src.tar"
            subprocess.run(["git", "archive", "-o", str(archive), args.baseline, "src"], cwd=ROOT, check=True)
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            report["baseline"] = {"commit": args.baseline,
                                  **summarise(run_worker(dict(base, size=args.baseline_size), Path(tmp) / "src"),
                                              args.baseline_size)}
        new = report["this_commit"].get(str(args.baseline_size))
        if new:
            report["speedup_vs_baseline"] = round(report["baseline"]["s_per_edit"] / new["s_per_edit"], 2)
    save()
    print(f"{'run':<28}{'s/edit':>8}  phases (s/edit)")
    rows = [(f"batch {k}", v) for k, v in report["this_commit"].items()]
    for dtype in args.v_dtypes:
        rows.append((f"batch {args.baseline_size}, v_dtype {dtype}", report[f"this_commit_{dtype}"]))
    if "this_commit_adam" in report:
        rows.append((f"batch {args.baseline_size}, adam", report["this_commit_adam"]))
    if "baseline" in report:
        rows.append((f"baseline {args.baseline}, batch {args.baseline_size}", report["baseline"]))
    for name, v in rows:
        print(f"{name:<28}{v['s_per_edit']:>8.3f}  " + ", ".join(f"{k} {s:.3f}" for k, s in v["phases_s_per_edit"].items())
              + (f"; passes {v['passes_per_request']}" if "passes_per_request" in v else ""))
    if "speedup_vs_baseline" in report:
        print(f"speed-up against {args.baseline} at batch {args.baseline_size}: {report['speedup_vs_baseline']}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
