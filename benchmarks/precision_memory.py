"""Resident memory of consecutive editing with float32 and with bfloat16 target values (`v_dtype`).

    python benchmarks/precision_memory.py                    # both, 12 batches of 10 edits each
    python benchmarks/precision_memory.py --v-dtypes bfloat16 --batches 30

For each setting, in a fresh process: the embedded model, WikiText-2 statistics,
one editor, then --batches consecutive batches of --batch-size records of
counterfact-scale.json (from --offset, beyond the scale runs' first 1,000). After
each batch: the resident set size after `gc.collect()` ("raw"), and again after
glibc's `malloc_trim(0)` ("trimmed": memory the process really holds). A flat
trimmed curve means nothing accumulates; the raw one also shows the allocator's
and oneDNN's caches. Writes OUT/precision_memory.json (OUT:
benchmarks/results/speed by default) and prints both series.
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--v-dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--offset", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "speed"))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one setting, in its own process
    return p.parse_args(argv)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> dict:
    import ctypes
    import gc

    import torch

    torch.set_num_threads(args.threads)
    from comeba.corpus import text_corpus
    from comeba.data import load_counterfact
    from comeba.editor import Editor
    from comeba.hparams import HParams
    from comeba.models import load_model

    trim = ctypes.CDLL("libc.so.6").malloc_trim
    model, tokenizer = load_model("embedded", device="cpu")
    n = args.batches * args.batch_size
    requests = load_counterfact(str(DATA / "counterfact" / "counterfact-scale.json"), offset=args.offset, n=n).requests
    editor = Editor(model, tokenizer, HParams(v_dtype=args.worker), corpus=text_corpus([str(DATA / "wikitext-2" / "valid.txt")]),
                    progress=False)
    raw, trimmed = [], []
    for b in range(args.batches):
        editor.edit(requests[b * args.batch_size : (b + 1) * args.batch_size])
        gc.collect()
        raw.append(round(rss_mb(), 1))
        trim(0)
        trimmed.append(round(rss_mb(), 1))
    return {"v_dtype": args.worker, "raw_mb": raw, "trimmed_mb": trimmed}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import cpu_model, git_commit

    report = {"benchmark": "precision_memory", "commit": git_commit(), "cpu": cpu_model(), "threads": args.threads,
              "records": f"counterfact-scale {args.offset}..{args.offset + args.batches * args.batch_size - 1}",
              "batch_size": args.batch_size, "runs": []}
    for dtype in args.v_dtypes:
        cmd = [sys.executable, __file__, "--worker", dtype, "--batches", str(args.batches), "--batch-size",
               str(args.batch_size), "--offset", str(args.offset), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        if done.returncode != 0:
            sys.exit(f"precision_memory: the {dtype} run failed:\n{done.stderr[-3000:]}")
        run = json.loads(done.stdout.strip().splitlines()[-1])
        report["runs"].append(run)
        print(f"{dtype}: raw MB {run['raw_mb']}\n{' ' * len(dtype)}  trimmed MB {run['trimmed_mb']}", flush=True)
    out = Path(args.out_dir) / "precision_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
