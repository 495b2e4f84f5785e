"""Which locality prompts an edit run changed, against how sure the unedited model was of them.

    python benchmarks/locality_margins.py benchmarks/results/table/runs/counterfact-consecutive-comeba

Reads a finished `comeba eval` folder (its records.jsonl and run settings),
recomputes on the unedited embedded model the lead of the top next-token
probability over the runner-up at each locality answer position (the smallest
over the answer's tokens), and splits the run's per-record locality by that
lead. It explains a locality shortfall that comes from near-ties the
teacher-forced argmax metric counts as changes. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from comeba import metrics as M
from comeba.data import load_dataset_spec
from comeba.models import load_model
from comeba.scoring import locality_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished comeba eval output folder")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1])
    args = p.parse_args()
    run = Path(args.run)
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    requests = load_dataset_spec(summary["data"], offset=summary.get("offset", 0),
                                 n=summary.get("n_requested")).requests
    if [r.case_id for r in requests] != [r["case_id"] for r in records]:
        raise SystemExit(f"{run}: its records are not those of {summary['data']}")
    model, tok = load_model(summary.get("model") or "embedded")

    # One locality prompt per record in the flat CounterFact/zsRE layouts; more are folded by their minimum lead.
    owners, prompts, answers = locality_prompts(requests)
    lead = [float("inf")] * len(requests)
    for o, (logits, _) in zip(owners, M._teacher_forced(model, tok, prompts, answers, M.DEFAULT_BATCH_SIZE)):
        top = torch.softmax(logits, -1).topk(2, dim=-1).values
        lead[o] = min(lead[o], float((top[:, 0] - top[:, 1]).min()))

    post = [r["post"]["locality"] for r in records]
    keep = [(m, loc) for m, loc in zip(lead, post) if loc is not None and m != float("inf")]
    changed = [m for m, loc in keep if loc < 100]
    kept = [m for m, loc in keep if loc == 100]
    print(f"{run.name}: {len(keep)} records with locality prompts, locality {sum(l for _, l in keep) / len(keep):.1f}")
    print(f"median lead of the unedited top token: {statistics.median(changed) if changed else float('nan'):.4f} "
          f"on the {len(changed)} records with a changed argmax, {statistics.median(kept):.4f} on the {len(kept)} kept")
    print("| lead below | records | locality | records at or above | locality |")
    print("|---:|---:|---:|---:|---:|")
    for t in args.thresholds:
        lo = [l for m, l in keep if m < t]
        hi = [l for m, l in keep if m >= t]
        mean = lambda xs: f"{sum(xs) / len(xs):.1f}" if xs else "—"  # noqa: E731
        print(f"| {t:g} | {len(lo)} | {mean(lo)} | {len(hi)} | {mean(hi)} |")


if __name__ == "__main__":
    main()
