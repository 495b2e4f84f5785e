"""Why the span gate has a subject floor: where locality fails at scale, and what a floor on α costs.

    python benchmarks/gate_floor.py STATE --n 200 [--shares 0 0.4 0.5 0.6]

STATE is an editor state (any format comeba loads) holding the first N records
of counterfact-scale.json (none of them in counterfact-dev.json), written with
the floor off, e.g.

    comeba eval --method comeba --data counterfact:../shared/data/counterfact/counterfact-scale.json \\
        --n 200 --batch-size 20 --hparams floor0.yaml ...   # floor0.yaml: gate_subject_share: 0

(the state of a run is its `state/` folder). For that state it measures, per
edited layer, the span-gate score h at the subject's last token of the edit
prompts and of their first rephrasings, the largest score over the tokens of
each neighbourhood prompt, and the score of N further (unedited) records'
subjects; lists the neighbourhood prompts whose teacher-forced answer the edits
changed, with the tokens where the gate opened; and, for each share ρ, sets
α_l = max(α_l, ρ · median of the edit scores at l) on the same state and
measures reliability / generality / locality (teacher-forced, as `comeba eval`).
It is a first-order probe (the batches were written with the floor off); the
consecutive runs with the floor on are the evidence that counts. Writes
OUT/floor.json and prints a table (OUT: benchmarks/results/gate_floor).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from comeba import metrics as M
from comeba.data import load_dataset_spec
from comeba.editor import Editor
from comeba.models import load_model
from comeba.requests import RequestError, make_template
from comeba.scoring import aggregate, evaluate_requests, locality_prompts, locality_reference
from comeba.text import subject_last_index

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-scale.json"


def _scores(model, tok, hooks, text: str) -> dict[int, torch.Tensor]:
    model(input_ids=torch.tensor([tok(text).input_ids]))
    return {l: r.scores[0].float() for l, r in hooks.records.items()}


@torch.no_grad()
def score_distributions(editor: Editor, requests, others) -> dict[str, list[dict[int, float]]]:
    model, tok = editor.model, editor.tokenizer
    out: dict[str, list[dict[int, float]]] = {"edit": [], "rephrase": [], "neighbour": [], "unedited": []}
    with editor.applied():
        hooks = editor.hooks
        hooks.record(True)
        for kind, reqs in (("edit", requests), ("unedited", others)):
            for r in reqs:
                at = subject_last_index(tok, r.prompt, r.subject)
                out[kind].append({l: float(v[at]) for l, v in _scores(model, tok, hooks, r.text).items()})
        for r in requests:
            for p in r.rephrase_prompts[:1]:
                try:
                    t = make_template(p, r.subject)
                except RequestError:
                    continue
                at = subject_last_index(tok, t, r.subject)
                out["rephrase"].append({l: float(v[at]) for l, v in _scores(model, tok, hooks, t.format(r.subject)).items()})
        for p in locality_prompts(requests)[1]:
            s = _scores(model, tok, hooks, p)
            out["neighbour"].append({l: float(torch.nan_to_num(v, -1.0).max()) for l, v in s.items()})
    return out


@torch.no_grad()
def changed_neighbours(editor: Editor, requests) -> list[dict]:
    """The neighbourhood prompts whose answer changed, with the tokens where each layer's gate opened."""
    model, tok = editor.model, editor.tokenizer
    owners, prompts, answers = locality_prompts(requests)
    before = M.argmax_tokens(model, tok, prompts, answers)
    with editor.applied():
        after = M.argmax_tokens(model, tok, prompts, answers)
        editor.hooks.record(True)
        rows = []
        for i, (b, a) in enumerate(zip(before, after)):
            if list(b) == list(a):
                continue
            scores = _scores(model, tok, editor.hooks, prompts[i])
            ids = tok(prompts[i]).input_ids
            opened = {l: [(tok.convert_ids_to_tokens(ids[p]), round(float(scores[l][p]), 3))
                          for p in rec.gate[0].nonzero().flatten().tolist()]
                      for l, rec in editor.hooks.records.items()}
            own = requests[owners[i]]
            rows.append({"prompt": prompts[i], "edit": f"{own.subject} → {own.target_new.strip()}",
                         "opened": {l: v for l, v in opened.items() if v}})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("state")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.4, 0.5, 0.6])
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "gate_floor"))
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("embedded")
    editor = Editor.from_pretrained(model, tok, args.state, progress=False)
    if editor.n_edits != args.n:
        raise SystemExit(f"{args.state} holds {editor.n_edits} edits, not --n {args.n}")
    records = load_dataset_spec(f"counterfact:{DATA}", n=2 * args.n).requests
    requests, others = records[: args.n], records[args.n :]
    dist = score_distributions(editor, requests, others)
    quantiles = {kind: {l: [round(q, 3) for q in statistics.quantiles([r[l] for r in rows], n=20)[0:10:4]]
                        for l in rows[0]} for kind, rows in dist.items() if rows}
    changed = changed_neighbours(editor, requests)
    reference = locality_reference(model, tok, requests)
    base = {l: s.alpha for l, s in editor.layers.items()}
    medians = {l: statistics.median(r[l] for r in dist["edit"]) for l in editor.layers}
    floors = []
    for rho in args.shares:
        for l, s in editor.layers.items():
            s.alpha = max(base[l], rho * medians[l])
        with editor.applied():
            agg = aggregate(evaluate_requests(model, tok, requests, reference, full=False))
        floors.append({"share": rho, "alpha": {l: round(s.alpha, 4) for l, s in editor.layers.items()},
                       **{k: round(agg[k], 2) for k in ("reliability", "generality", "locality")}})
        print(f"ρ {rho}: α {list(floors[-1]['alpha'].values())}  rel {agg['reliability']:.1f}  "
              f"gen {agg['generality']:.1f}  loc {agg['locality']:.1f}", flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"state": str(args.state), "n_edits": args.n, "alpha": base,
              "score_quantiles_5_25_50": quantiles, "changed_neighbours": changed, "floors": floors}
    (out / f"floor-{args.n}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    for kind, q in quantiles.items():
        print(kind, q)
    for row in changed:
        print(row["prompt"], "|", row["edit"], "|", row["opened"] or "no gate open")
    print(f"wrote {out / f'floor-{args.n}.json'}")


if __name__ == "__main__":
    main()
