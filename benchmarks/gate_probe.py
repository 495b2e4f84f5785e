"""Can a gate tell edited subjects from general text at 20 … 2,000 edits? A fast probe from keys alone.

The key-span score s(k) = kᵀ G k / tr(G C0), G = (λC0)⁻¹ − C_accu⁻¹, depends only on the
statistics and the accumulated keys, not on the target values, so its separability at N edits can
be measured without editing: take the subject keys of N CounterFact records (as the editor
computes them, on the unedited model), form C_accu = λC0 + Σ K Kᵀ, and score general text
(WikiText-2 test), the edited subjects (bare prompt and rephrasing) and the neighbourhood prompts.
The threshold is the (1 − ε) quantile on a held-back calibration sample (end of WikiText-2 valid,
not in the statistics' first 100k tokens); every other rate is measured on other text.

    python benchmarks/gate_probe.py --sizes 20 200 1000 2000 --out benchmarks/results/gate_probe/gate_probe.json

Writes every row to --out (default benchmarks/results/gate_probe/gate_probe.json) and prints
each row's ε = 1e-3 columns as one JSON line; benchmarks/results/gate_probe/gate_probe.jsonl
holds those printed lines from the run the README quotes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from comeba.compute import context_templates, subject_keys  # noqa: E402
from comeba.data import load_counterfact  # noqa: E402
from comeba.hparams import HParams  # noqa: E402
from comeba.models import detect_layout, fingerprint, load_model  # noqa: E402
from comeba.stats import load_or_compute_stats  # noqa: E402
from comeba.corpus import text_corpus  # noqa: E402
from comeba.text import encode_prompt, pad_batch, subject_last_index  # noqa: E402
from comeba.trace import trace  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def paragraphs(path: Path, n: int, tokens: int, tok, from_end: bool = False) -> list[list[int]]:
    lines = [l.strip() for l in path.read_text().splitlines() if len(l.strip()) > 200 and not l.strip().startswith("=")]
    if from_end:
        lines = lines[::-1]
    return [encode_prompt(tok, l)[:tokens] for l in lines[:n]]


@torch.no_grad()
def token_keys(model, tok, layout, layers, seqs: list[list[int]], chunk: int = 32):
    """Keys of every token, per layer: list over sequences of (T, d) float64, per layer."""
    names = {l: layout.mlp_out_name(l) for l in layers}
    out = {l: [] for l in layers}
    for i in range(0, len(seqs), chunk):
        part = seqs[i : i + chunk]
        ids, mask = pad_batch(part, tok.pad_token_id)
        with trace(model, list(names.values()), inputs=True, stop_after=names[max(layers)]) as rec:
            model(input_ids=ids, attention_mask=mask)
        for l, name in names.items():
            for j, s in enumerate(part):
                out[l].append(rec[name].input[j, : len(s)].to(torch.float64))
    return out


def setup(n_max: int):
    """Defaults, the embedded model, its WikiText-2 C0 and templates; scale records 0..n_max-1 (edited) and the
    next 200 (unedited subjects)."""
    hp = HParams()
    model, tok = load_model("embedded")
    layout = detect_layout(model)
    corpus = text_corpus([DATA / "wikitext-2" / "valid.txt"])
    c0, _ = load_or_compute_stats(model, tok, layout, hp.layers, corpus, hp.mom2_n_tokens, model_fp=fingerprint(model))
    templates = context_templates(model, tok, hp)
    reqs = load_counterfact(DATA / "counterfact" / "counterfact-scale.json", n=n_max + 200).requests
    return hp, model, tok, layout, c0, templates, reqs[:n_max], reqs[n_max : n_max + 200]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 200, 1000, 2000])
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-3, 1e-4])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gate_probe" / "gate_probe.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_max = max(args.sizes)
    hp, model, tok, layout, c0, templates, edited, others = setup(n_max)
    t0 = time.perf_counter()
    K = {l: subject_keys(model, tok, layout, l, edited, templates) for l in hp.layers}
    print(f"subject keys of {len(edited)} records in {time.perf_counter() - t0:.0f} s", flush=True)

    def at_subject(texts_subjects):
        seqs, idx = [], []
        for prompt, subject in texts_subjects:
            tmpl = prompt.replace(subject, "{}", 1)
            seqs.append(encode_prompt(tok, prompt))
            idx.append(subject_last_index(tok, tmpl, subject))
        keys = token_keys(model, tok, layout, hp.layers, seqs)
        return {l: torch.stack([k[i] for k, i in zip(keys[l], idx)]) for l in hp.layers}

    bare = at_subject([(r.text, r.subject) for r in edited])
    reph = [(p, r.subject, i) for i, r in enumerate(edited) for p in r.rephrase_prompts if p.count(r.subject) == 1]
    reph_keys = at_subject([(p, s) for p, s, _ in reph])
    reph_owner = torch.tensor([i for _, _, i in reph])
    other_keys = at_subject([(r.text, r.subject) for r in others])
    neigh_seqs = [encode_prompt(tok, p) for r in edited for p in r.locality_prompts]
    neigh_owner = torch.tensor([i for i, r in enumerate(edited) for _ in r.locality_prompts])
    neigh = token_keys(model, tok, layout, hp.layers, neigh_seqs)
    calib = token_keys(model, tok, layout, hp.layers, paragraphs(DATA / "wikitext-2" / "valid.txt", 150, 64, tok, from_end=True))
    test = token_keys(model, tok, layout, hp.layers, paragraphs(DATA / "wikitext-2" / "test.txt", 200, 64, tok))

    lam = hp.mom2_update_weight
    results = []
    for n in args.sizes:
        for l in hp.layers:
            A0 = lam * c0[l]
            Kn = K[l][:n]
            S = Kn.T @ Kn
            C = A0 + S
            G = torch.linalg.solve(C, S) @ torch.linalg.inv(A0)
            G = 0.5 * (G + G.T)
            norm = float(torch.trace(G @ c0[l]))
            A0inv = torch.linalg.inv(A0)

            def s(k):
                return ((k @ G) * k).sum(-1) / norm

            def h(k):
                return ((k @ G) * k).sum(-1) / ((k @ A0inv) * k).sum(-1)

            for name, f in (("span", s), ("span_rel", h)):
                cal = torch.cat([f(k) for k in calib[l]])
                cal_no0 = torch.cat([f(k[1:]) for k in calib[l]])
                tst = [f(k) for k in test[l]]
                tst_all = torch.cat(tst)
                row = {"n_edits": n, "layer": l, "score": name,
                       "general_median": float(tst_all.median()), "general_max": float(tst_all.max()),
                       "subject_median": float(f(bare[l][:n]).median()),
                       "rephrase_median": float(f(reph_keys[l][reph_owner < n]).median())}
                for eps in args.eps:
                    for excl0, c in (("", cal), ("_no_pos0", cal_no0)):
                        tau = float(torch.quantile(c, 1 - eps)) if c.numel() * eps >= 1 else float(c.max())
                        key = f"eps{eps:g}{excl0}"
                        row[f"{key}_tau"] = tau
                        row[f"{key}_false_open"] = float((tst_all >= tau).float().mean())
                        row[f"{key}_subject_open"] = float((f(bare[l][:n]) >= tau).float().mean())
                        row[f"{key}_rephrase_open"] = float((f(reph_keys[l][reph_owner < n]) >= tau).float().mean())
                        row[f"{key}_unedited_subject_open"] = float((f(other_keys[l]) >= tau).float().mean())
                        nk = [f(neigh[l][j]) for j in range(len(neigh_seqs)) if neigh_owner[j] < n]
                        row[f"{key}_neighbour_prompt_open"] = sum(bool((x >= tau).any()) for x in nk) / max(1, len(nk))
                results.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                  if k.startswith("eps0.001_") or not k.startswith("eps")}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
