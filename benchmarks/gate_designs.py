"""Which span-gate score still separates edited subjects from other text at 1,000+ edits? A probe from keys alone.

benchmarks/gate_probe.py showed why the span gate saturates: whitened against
general text, a token's key is isotropic on average, so its span share h is
about rank(span)/d_in for *any* token once N edits approach d_in (median 0.42
at 1,000 edits, d_in = 1536). This probe scores variants of the span gate on
the same keys, all with d_in × d_in memory per layer (no key bank):

- ``h``       the shipped score, h(k) = wᵀ H w / wᵀ w, H = S (I + S)⁻¹;
- ``h_b{β}``  a sharper span, H = S (βI + S)⁻¹: only directions with whitened edit energy ≫ β count;
- ``cum``     (``cum_b{β}`` with --cum-beta) the mean of h over the hooked layers up to this one at the same token (causal: the hook at
              layer l knows the scores of layers ≤ l); general text's scores are partly independent
              across layers, an edited subject's are high at all of them;
- ``and``     open at layer l only if h opened at every hooked layer ≤ l (each at its own threshold).

For each, thresholds are the (1 − ε) quantile on held-back general text (end of
WikiText-2 valid), rates on WikiText-2 test paragraphs, the edited subjects
(bare prompt and rephrasings), 200 unedited subjects and the edits'
neighbourhood prompts (first two per edit; share with any open token). Keys are computed once on the
unedited model and cached in --cache.

    python benchmarks/gate_designs.py --sizes 200 1000 2000 --out benchmarks/results/gate_probe/gate_designs.json
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from comeba.compute import subject_keys  # noqa: E402
from comeba.text import encode_prompt, subject_last_index  # noqa: E402
from gate_probe import DATA, paragraphs, setup, token_keys  # noqa: E402


def collect(n_max: int, threads: int) -> dict:
    """Every key the probe scores, per layer, on the unedited model (float32 to keep the cache small)."""
    torch.set_num_threads(threads)
    hp, model, tok, layout, c0, templates, edited, others = setup(n_max)
    t0 = time.perf_counter()
    K = {l: subject_keys(model, tok, layout, l, edited, templates).float() for l in hp.layers}
    print(f"subject keys of {len(edited)} records in {time.perf_counter() - t0:.0f} s", flush=True)

    def at_subject(pairs):
        seqs, idx = [], []
        for prompt, subject in pairs:
            seqs.append(encode_prompt(tok, prompt))
            idx.append(subject_last_index(tok, prompt.replace(subject, "{}", 1), subject))
        keys = token_keys(model, tok, layout, hp.layers, seqs)
        return {l: torch.stack([k[i] for k, i in zip(keys[l], idx)]).float() for l in hp.layers}

    reph = [(p, r.subject, i) for i, r in enumerate(edited) for p in r.rephrase_prompts if p.count(r.subject) == 1]
    neigh_seqs = [encode_prompt(tok, p) for r in edited for p in r.locality_prompts[:2]]
    flat = lambda keys: {l: [k.float() for k in keys[l]] for l in hp.layers}  # noqa: E731
    return {
        "layers": list(hp.layers), "lam": hp.mom2_update_weight, "c0": {l: c0[l].double() for l in hp.layers},
        "K": K, "bare": at_subject([(r.text, r.subject) for r in edited]),
        "reph": at_subject([(p, s) for p, s, _ in reph]), "reph_owner": torch.tensor([i for _, _, i in reph]),
        "other": at_subject([(r.text, r.subject) for r in others]),
        "neigh": flat(token_keys(model, tok, layout, hp.layers, neigh_seqs)),
        "neigh_owner": torch.tensor([i for i, r in enumerate(edited) for _ in r.locality_prompts[:2]]),
        "calib": flat(token_keys(model, tok, layout, hp.layers,
                                 paragraphs(DATA / "wikitext-2" / "valid.txt", 150, 64, tok, from_end=True))),
        "test": flat(token_keys(model, tok, layout, hp.layers,
                                paragraphs(DATA / "wikitext-2" / "test.txt", 200, 64, tok))),
    }


def span_matrices(c0: torch.Tensor, keys: torch.Tensor, lam: float, beta: float):
    """Whitening P (λC0 = L Lᵀ, P = L⁻¹) and H_β = S (βI + S)⁻¹ with S = P Kᵀ K Pᵀ (float64)."""
    a0 = lam * c0
    eye = torch.eye(a0.shape[0], dtype=torch.float64)
    P = torch.linalg.solve_triangular(torch.linalg.cholesky(a0), eye, upper=False)
    W = keys.double() @ P.T
    S = W.T @ W
    H = torch.linalg.solve(beta * eye + S, S)
    return P, 0.5 * (H + H.T)


def score_fn(P, H):
    def h(k: torch.Tensor) -> torch.Tensor:
        w = k.double() @ P.T
        return ((w @ H) * w).sum(-1) / (w * w).sum(-1)
    return h


def rates(scores: dict, eps: float) -> dict:
    """Open rates of one design at one layer, given its scores on every key set and its threshold."""
    cal = torch.cat(scores["calib"])
    tau = float(torch.quantile(cal, 1 - eps))
    test = torch.cat(scores["test"])
    return {"tau": tau, "general_median": float(test.median()),
            "false_open": float((test >= tau).float().mean()),
            "subject_open": float((scores["bare"] >= tau).float().mean()),
            "rephrase_open": float((scores["reph"] >= tau).float().mean()),
            "unedited_subject_open": float((scores["other"] >= tau).float().mean()),
            "open": {name: [x >= tau for x in scores[name]] if isinstance(scores[name], list) else scores[name] >= tau
                     for name in ("calib", "test", "bare", "reph", "other", "neigh")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 2000])
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--betas", type=float, nargs="+", default=[0.1, 10.0])
    ap.add_argument("--cum-beta", type=float, default=1.0, help="the β of the span whose scores `cum` and `and` use")
    ap.add_argument("--cache", default="/tmp/comeba-gate-designs.pt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gate_probe" / "gate_designs.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    if cache.is_file() and len(torch.load(cache, weights_only=False)["K"][4]) >= max(args.sizes):
        data = torch.load(cache, weights_only=False)
    else:
        data = collect(max(args.sizes), args.threads)
        torch.save(data, cache)
    layers, rows = data["layers"], []
    for n in args.sizes:
        reph_mask = data["reph_owner"] < n
        neigh_idx = [j for j in range(len(data["neigh_owner"])) if data["neigh_owner"][j] < n]
        per_layer_h = {}
        for beta in dict.fromkeys([1.0, *args.betas, args.cum_beta]):
            name = "h" if beta == 1.0 else f"h_b{beta:g}"
            for l in layers:
                P, H = span_matrices(data["c0"][l], data["K"][l][:n], data["lam"], beta)
                f = score_fn(P, H)
                sc = {"calib": [f(k) for k in data["calib"][l]], "test": [f(k) for k in data["test"][l]],
                      "bare": f(data["bare"][l][:n]), "reph": f(data["reph"][l][reph_mask]),
                      "other": f(data["other"][l]), "neigh": [f(data["neigh"][l][j]) for j in neigh_idx]}
                if beta == args.cum_beta:
                    per_layer_h[l] = sc
                rows.append(summarise(n, l, name, sc, args.eps))
        # causal designs across layers, built from h
        prev_open = None
        for i, l in enumerate(layers):
            upto = layers[: i + 1]
            cum = {key: _mean([per_layer_h[j][key] for j in upto]) for key in per_layer_h[l]}
            suffix = "" if args.cum_beta == 1.0 else f"_b{args.cum_beta:g}"
            rows.append(summarise(n, l, "cum" + suffix, cum, args.eps))
            r = rates(per_layer_h[l], args.eps)
            opened = r["open"] if prev_open is None else {k: _and(prev_open[k], r["open"][k]) for k in r["open"]}
            prev_open = opened
            rows.append(summarise_open(n, l, "and" + suffix, opened, per_layer_h[l]))
        for row in rows:
            if row["n_edits"] == n:
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


def _mean(parts):
    if isinstance(parts[0], list):
        return [sum(xs) / len(xs) for xs in zip(*parts)]
    return sum(parts) / len(parts)


def _and(a, b):
    if isinstance(a, list):
        return [x & y for x, y in zip(a, b)]
    return a & b


def summarise(n: int, layer: int, design: str, scores: dict, eps: float) -> dict:
    r = rates(scores, eps)
    row = summarise_open(n, layer, design, r["open"], scores)
    row["tau"] = r["tau"]
    row["general_median"] = r["general_median"]
    return row


def summarise_open(n: int, layer: int, design: str, opened: dict, scores: dict) -> dict:
    test = torch.cat(opened["test"])
    return {"n_edits": n, "layer": layer, "design": design,
            "false_open": float(test.float().mean()),
            "calib_open": float(torch.cat(opened["calib"]).float().mean()),
            "subject_open": float(opened["bare"].float().mean()),
            "rephrase_open": float(opened["reph"].float().mean()),
            "unedited_subject_open": float(opened["other"].float().mean()),
            "neighbour_prompt_open": sum(bool(x.any()) for x in opened["neigh"]) / max(1, len(opened["neigh"]))}


if __name__ == "__main__":
    main()
