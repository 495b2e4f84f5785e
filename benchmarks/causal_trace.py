"""Causal tracing of the embedded model's MLPs: which layers carry a fact at the subject's last token.

    python benchmarks/causal_trace.py            # ~10 min on 2 CPU cores; writes benchmarks/results/causal_trace/causal_trace.{json,png,md}

Evidence for the edited layers (issue 3.6), after Meng et al. (ROME, 2022):
for a CounterFact fact the model knows, run the prompt with Gaussian noise
(3 × the standard deviation of the subject's token embeddings) added to the
subject's embeddings; then, layer by layer, run it again with the same noise
but with the MLP outputs of a window of layers around l restored to their
clean values at the subject's last token. The *indirect effect* of l is
P(true answer | restored) − P(true answer | corrupted), averaged over noise
samples and facts. Editing the layers where it peaks is MEMIT's choice.

Facts come from CounterFact dev records --offset.. (default 1000: outside the
0-199 slice the benchmark table edits, so the layers are not chosen on the
test records); a fact counts as known when the first token of its true object
is among the model's top --top-k next tokens. Only ../shared/data is read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from comeba import metrics as M
from comeba.data import load_counterfact
from comeba.models import detect_layout, load_model, num_layers
from comeba.text import encode_prompt, encode_target, subject_last_index
from comeba.trace import trace

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-dev.json"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, git_commit  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CounterFact file (default ../shared/data/...-dev.json)")
    p.add_argument("--offset", type=int, default=1000, help="first record scanned (default 1000)")
    p.add_argument("--n-facts", type=int, default=60, help="known facts to trace (default 60)")
    p.add_argument("--scan", type=int, default=600, help="records scanned at most (default 600)")
    p.add_argument("--top-k", type=int, default=5, help="'known': the true token in the model's top k (default 5)")
    p.add_argument("--samples", type=int, default=3, help="noise samples per fact (default 3)")
    p.add_argument("--window", type=int, default=3, help="MLP layers restored together, centred on l (default 3)")
    p.add_argument("--noise", type=float, default=3.0, help="noise std in embedding stds (default 3)")
    p.add_argument("--model", default="embedded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "causal_trace" / "causal_trace"),
                   help="output path without suffix (default benchmarks/results/causal_trace/causal_trace)")
    return p.parse_args()


def answer_probs(model, ids: torch.Tensor, answer: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -1].float()
    return torch.softmax(logits, dim=-1)[:, answer]


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model)
    model.eval()
    layout = detect_layout(model)
    n_layers = num_layers(model, layout)
    names = [layout.mlp_out_name(i) for i in range(n_layers)]
    embed = model.get_input_embeddings()
    requests = load_counterfact(args.data, offset=args.offset, n=args.scan).requests

    # 1. Known facts: the true object's first token among the top k after the prompt.
    facts = []
    for r in requests:
        if len(facts) >= args.n_facts:
            break
        if not r.ground_truth:
            continue
        ids = encode_prompt(tok, r.text)
        answer = encode_target(tok, M.continuation(r.ground_truth))[0]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        if answer in torch.topk(logits, args.top_k).indices.tolist():
            prefix = r.prompt[: r.prompt.index("{}")]
            # The subject's first token: after the prefix's tokens (its trailing space joins the subject).
            first = len(encode_prompt(tok, prefix.rstrip() if prefix.strip() else ""))
            last = subject_last_index(tok, r.prompt, r.subject)
            facts.append((r, ids, answer, first, last))
    if not facts:
        raise SystemExit("no known facts found; raise --scan or --top-k")

    # 2. Noise scale: the std of the subjects' token embeddings.
    with torch.no_grad():
        subj = torch.cat([embed(torch.tensor(ids[a:b + 1])) for _, ids, _, a, b in facts])
    sigma = args.noise * subj.float().std().item()

    # 3. Trace every fact: rows = [corrupted × S] + [restore window at l × S for each l].
    S, half = args.samples, args.window // 2
    effects = torch.zeros(len(facts), n_layers)
    clean_p, corrupt_p = [], []
    t0 = time.perf_counter()
    for f, (r, ids, answer, a, b) in enumerate(tqdm(facts, desc="tracing", unit="fact")):
        x = torch.tensor([ids])
        with trace(model, names, outputs=True) as rec:
            p_clean = answer_probs(model, x, answer)[0].item()
        clean = {n: rec[n].output[0, b].clone() for n in names}
        rows = S * (1 + n_layers)
        noise = torch.randn(S, b - a + 1, embed.weight.shape[1]) * sigma
        sample_of_row = torch.arange(rows) % S
        restore_of_row = torch.div(torch.arange(rows), S, rounding_mode="floor") - 1  # -1: no restoration

        def corrupt(mod, args_, out):
            out = out.clone()
            out[:, a:b + 1] += noise[sample_of_row].to(out.dtype)
            return out

        def restore(name, out):
            layer = names.index(name)
            hit = (restore_of_row >= 0) & ((restore_of_row - layer).abs() <= half)
            if not hit.any():
                return out
            out = out.clone()
            out[hit, b] = clean[name].to(out.dtype)
            return out

        handle = embed.register_forward_hook(corrupt)
        try:
            with trace(model, names, edit_output=restore):
                p = answer_probs(model, x.expand(rows, -1), answer)
        finally:
            handle.remove()
        p = p.view(1 + n_layers, S).mean(dim=1)
        clean_p.append(p_clean)
        corrupt_p.append(p[0].item())
        effects[f] = p[1:] - p[0]
    seconds = time.perf_counter() - t0

    mean_ie = effects.mean(0)
    gap = torch.tensor(clean_p) - torch.tensor(corrupt_p)
    norm_ie = (effects / gap.clamp_min(1e-6)[:, None]).mean(0)
    order = torch.argsort(mean_ie, descending=True).tolist()
    result = {
        "model": args.model, "data": str(args.data), "offset": args.offset, "facts": len(facts),
        "case_ids": [r.case_id for r, *_ in facts], "scanned": args.scan, "top_k": args.top_k,
        "samples": S, "window": args.window, "noise_sigma": sigma, "seed": args.seed,
        "mean_p_clean": sum(clean_p) / len(facts), "mean_p_corrupted": sum(corrupt_p) / len(facts),
        "indirect_effect": [round(v, 5) for v in mean_ie.tolist()],
        "indirect_effect_normalised": [round(v, 4) for v in norm_ie.tolist()],
        "indirect_effect_stderr": [round(v, 5) for v in (effects.std(0) / len(facts) ** 0.5).tolist()],
        "layers_by_effect": order, "seconds": round(seconds, 1), "commit": git_commit(), "cpu": cpu_model(),
        "command": "python benchmarks/causal_trace.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, out)
    print(f"{len(facts)} facts, p(true) clean {result['mean_p_clean']:.3f}, corrupted {result['mean_p_corrupted']:.3f}")
    print("layers by indirect effect:", order[:8])


def write_report(res: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ie, se = res["indirect_effect"], res["indirect_effect_stderr"]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(range(len(ie)), ie, yerr=se, color="tab:green", capsize=2)
    ax.set_xlabel("layer l (MLP outputs of layers l±%d restored at the subject's last token)" % (res["window"] // 2))
    ax.set_ylabel("indirect effect on P(true)")
    ax.set_title(f"Causal tracing, {res['model']}: {res['facts']} known CounterFact facts")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)

    lines = [
        "# Causal tracing of the embedded model's MLP layers",
        "",
        f"`{res['command']}` at commit `{res['commit']}` on {res['cpu']} ({res['seconds']} s).",
        "",
        f"{res['facts']} CounterFact dev facts from record {res['offset']} on that the model knows (true object's "
        f"first token in its top {res['top_k']}); noise σ = {res['noise_sigma']:.4f} on the subject's embeddings, "
        f"{res['samples']} samples per fact; windows of {res['window']} MLP layers restored at the subject's last "
        f"token. Mean P(true): clean {res['mean_p_clean']:.3f}, corrupted {res['mean_p_corrupted']:.3f}.",
        "",
        f"![causal trace]({out.with_suffix('.png').name})",
        "",
        "| layer | indirect effect | ± s.e. | share of the clean–corrupted gap |",
        "|---:|---:|---:|---:|",
    ]
    for i, (v, s, nv) in enumerate(zip(res["indirect_effect"], res["indirect_effect_stderr"],
                                       res["indirect_effect_normalised"])):
        lines.append(f"| {i} | {v:.4f} | {s:.4f} | {nv:.3f} |")
    lines += ["", f"Layers by effect: {res['layers_by_effect']}.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
