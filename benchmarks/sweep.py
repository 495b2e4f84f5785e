"""A sweep of comeba's hyperparameters on the embedded model, consecutive protocol, held-out CounterFact records.

    python benchmarks/sweep.py                      # the default grid (about 8 min per point on 2 CPU cores)
    python benchmarks/sweep.py --lambdas 1000 15000 --layers 4-8 3-7

Evidence for the defaults (issue 3.6): each point edits CounterFact dev
records --offset.. (default 1000, outside the 0-199 slice of the benchmark
table) in consecutive batches and evaluates all of them after the last batch
(teacher-forced reliability, generality, locality). Statistics: WikiText-2
valid, as the table. Everything goes to --out-dir (default
benchmarks/results/sweep/): a finished point is kept in OUT/<point>/ and
skipped when the script runs again, the unedited model's evaluation of the
records in OUT/pre-<offset>-<n>.json, the table in OUT/SWEEP.md and
OUT/sweep.json. Only ../shared/data is read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from comeba.data import load_counterfact
from comeba.evaluate import Settings, evaluate
from comeba.hparams import HParams
from comeba.models import load_model
from comeba.corpus import text_corpus

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, git_commit  # noqa: E402


def layer_range(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lambdas", type=float, nargs="+", default=[1000.0, 5000.0, 15000.0], help="λ values")
    p.add_argument("--layers", nargs="+", default=["4-8"], help="edited layer ranges, e.g. 4-8 3-7")
    p.add_argument("--alphas", type=float, nargs="+", default=[2.2], help="initial thresholds α₀")
    p.add_argument("--model", default="embedded", help="'embedded' (default), a HF id or a local folder")
    p.add_argument("--offset", type=int, default=1000)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--stats-tokens", type=int, default=100_000)
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "sweep"),
                   help="where the points, SWEEP.md and sweep.json go (default benchmarks/results/sweep/)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    model, tok = load_model(args.model)
    data = Path(args.data_dir)
    requests = load_counterfact(data / "counterfact" / "counterfact-dev.json", offset=args.offset, n=args.n).requests
    corpus = text_corpus([data / "wikitext-2" / "valid.txt"])
    settings = Settings(counterfact=True, generation=False, fluency_tokens=0)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = []
    for layers in args.layers:
        for lam in args.lambdas:
            for alpha in args.alphas:
                hp = HParams(layers=layer_range(layers), mom2_update_weight=lam, alpha=alpha,
                             mom2_n_tokens=args.stats_tokens)
                name = f"layers{layers}-lambda{lam:g}-alpha{alpha:g}"
                t = time.perf_counter()
                s = evaluate(model, tok, requests, method="comeba", protocol="consecutive", hparams=hp,
                             corpus=corpus, batch_size=args.batch_size, checkpoint_every=10**6,
                             settings=settings, out=out / name,
                             pre_cache=out / f"pre-{args.offset}-{args.n}.json")
                alphas = (s.get("method_info") or {}).get("alpha")
                points.append({"point": name, "layers": layer_range(layers), "lambda": lam, "alpha0": alpha,
                               "post": s["post"], "pre": s["pre"], "final_alpha": alphas,
                               "seconds_per_edit": s["seconds_per_edit"], "wall_seconds": round(time.perf_counter() - t, 1)})
                print(f"{name}: " + ", ".join(f"{k} {s['post'][k]:.1f}" for k in
                                              ("reliability", "generality", "locality", "neighborhood_score")), flush=True)
    result = {"command": "python benchmarks/sweep.py " + " ".join(sys.argv[1:]), "commit": git_commit(),
              "cpu": cpu_model(), "offset": args.offset, "n": args.n, "batch_size": args.batch_size,
              "points": points}
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Hyperparameter sweep: comeba, consecutive protocol, embedded model", "",
             f"`{result['command']}` at commit `{result['commit']}` on {result['cpu']}.", "",
             f"CounterFact dev records {args.offset}–{args.offset + args.n - 1} (held out from the table's 0–199), "
             f"{args.n // args.batch_size} consecutive batches of {args.batch_size}, all edits evaluated after the "
             "last batch (teacher-forced, percent).", "",
             "| layers | λ | α₀ | reliability | generality | locality | neighbourhood score | α after (per layer) | s/edit |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for pt in points:
        po = pt["post"]
        fa = pt["final_alpha"]
        fa_text = ", ".join(f"{v:.2f}" for v in fa.values()) if isinstance(fa, dict) else str(fa)
        lines.append(f"| {pt['layers'][0]}–{pt['layers'][-1]} | {pt['lambda']:g} | {pt['alpha0']:g} | "
                     f"{po['reliability']:.1f} | {po['generality']:.1f} | {po['locality']:.1f} | "
                     f"{po['neighborhood_score']:.1f} | {fa_text} | {pt['seconds_per_edit']:.2f} |")
    (out / "SWEEP.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'SWEEP.md'}")


if __name__ == "__main__":
    main()
