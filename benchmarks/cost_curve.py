"""The cost of a batch against the number of edits already written: it should stay flat.

    python benchmarks/cost_curve.py                          # 1,000 edits, batches of 20, on the CPU
    python benchmarks/cost_curve.py --n 10000 --batch-size 100 --device cuda   # on a GPU
    python benchmarks/cost_curve.py --report-only            # redraw the plot from cost.json

Consecutive batches of counterfact-scale.json records (none in the dev file)
are written into one editor (embedded model, WikiText-2 statistics, span
gate, default hyperparameters) with no evaluation in between. Per batch:
seconds, the process's resident memory (and CUDA peak memory on a GPU). At
the end: greedy generation throughput with the hooks of all edits attached
against without them. The state is saved every --save-every batches, so an
interrupted run resumes from there. Writes OUT/cost.json and OUT/cost.png
(OUT: benchmarks/results/speed/cost-<n>-<batch size>-<device> by default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PROMPTS = ("The capital of France is", "Once upon a time, there was a", "The best way to learn a new language is",
           "In 1969, the first human", "Water boils at a temperature of")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-scale.json"))
    p.add_argument("--stats-text", default=str(DATA / "wikitext-2" / "valid.txt"))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=5, help="batches between saved states (resume points)")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def plot(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["batches"]
    x = [r["edits_before"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(x, [r["seconds"] / r["n"] for r in rows], ".-")
    a.set_xlabel("edits already in the state")
    a.set_ylabel("seconds per edit of the batch")
    a.set_ylim(bottom=0)
    a.set_title(f"batch {result['batch_size']}, {result['device']}")
    b.plot(x, [r["rss_mb"] for r in rows], ".-", label="resident memory (MB)")
    if any(r.get("cuda_peak_mb") for r in rows):
        b.plot(x, [r.get("cuda_peak_mb") or 0 for r in rows], ".-", label="CUDA peak (MB)")
    b.set_xlabel("edits already in the state")
    b.set_ylabel("MB")
    b.set_ylim(bottom=0)
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out_dir or ROOT / "benchmarks" / "results" / "speed" / f"cost-{args.n}-{args.batch_size}-{device}")
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / "cost.json"
    if args.report_only:
        plot(out, json.loads(result_file.read_text()))
        return 0
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import cpu_model, git_commit

    from comeba.data import load_counterfact
    from comeba.editor import Editor, greedy_generate
    from comeba.hparams import HParams
    from comeba.models import load_model
    from comeba.corpus import text_corpus

    model, tokenizer = load_model("embedded", device=device)
    requests = load_counterfact(args.data, offset=0, n=args.n).requests
    state = out / "state"
    result = json.loads(result_file.read_text()) if result_file.exists() and state.exists() else None
    if result is not None:
        editor = Editor.from_pretrained(model, tokenizer, state, progress=False)
        result["batches"] = [r for r in result["batches"] if r["edits_before"] < editor.n_edits]
        print(f"resuming after {editor.n_edits} edits", flush=True)
    else:
        editor = Editor(model, tokenizer, HParams(), corpus=text_corpus([args.stats_text]), progress=False)
        result = {"benchmark": "cost_curve", "commit": git_commit(), "cpu": cpu_model(), "device": device,
                  "threads": args.threads, "batch_size": args.batch_size, "n": args.n, "data": args.data,
                  "batches": []}
    cuda = device == "cuda"
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), initial=editor.n_edits, unit="edit", desc="consecutive edits")
        while editor.n_edits < len(requests):
            batch = requests[editor.n_edits : editor.n_edits + args.batch_size]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            start = time.perf_counter()
            before = editor.n_edits
            editor.edit(batch)
            if cuda:
                torch.cuda.synchronize()
            row = {"edits_before": before, "n": len(batch), "seconds": round(time.perf_counter() - start, 3),
                   "rss_mb": round(rss_mb(), 1), "at": time.strftime("%H:%M:%S"),
                   "load_1min": round(os.getloadavg()[0], 2)}  # other work on the machine shows here
            if cuda:
                row["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            result["batches"].append(row)
            bar.update(len(batch))
            bar.set_postfix(s_per_edit=f"{row['seconds'] / len(batch):.2f}")
            if editor.n_batches % args.save_every == 0 or editor.n_edits >= len(requests):
                editor.save_pretrained(state)
                result_file.write_text(json.dumps(result, indent=1) + "\n")
        bar.close()
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to resume from the last saved state", file=sys.stderr)
        return 130

    # Generation throughput with all edits attached, against without (interleaved, best of 3 each).
    greedy_generate(model, tokenizer, PROMPTS[:1], 4)  # warm-up
    best = {"plain": float("inf"), "hooked": float("inf")}
    for _ in range(3):
        for name in best:
            if name == "hooked":
                editor.attach()
            start = time.perf_counter()
            greedy_generate(model, tokenizer, list(PROMPTS), args.gen_tokens)
            best[name] = min(best[name], time.perf_counter() - start)
            editor.detach()
    tokens = len(PROMPTS) * args.gen_tokens
    result["generation"] = {"tokens": tokens, "plain_tokens_per_s": round(tokens / best["plain"], 2),
                            "hooked_tokens_per_s": round(tokens / best["hooked"], 2),
                            "ratio": round(best["plain"] / best["hooked"], 3), "edits": editor.n_edits}
    secs = [r["seconds"] / r["n"] for r in result["batches"]]
    tenth = max(1, len(secs) // 10)
    result["summary"] = {"first_tenth_s_per_edit": round(sum(secs[:tenth]) / tenth, 3),
                         "last_tenth_s_per_edit": round(sum(secs[-tenth:]) / tenth, 3),
                         "rss_mb_first": result["batches"][0]["rss_mb"], "rss_mb_last": result["batches"][-1]["rss_mb"]}
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    plot(out, result)
    print(json.dumps({"summary": result["summary"], "generation": result["generation"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
