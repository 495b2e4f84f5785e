"""Core measurements of comeba on the embedded model (the README's Performance table).

    python benchmarks/bench_core.py                       # full size: run it on an otherwise idle machine
    python benchmarks/bench_core.py --stats-tokens 5000 --n-edits 2 --out /tmp/core.json   # smoke run

Timings are only comparable on an idle machine: the 1-minute load average at the
start is recorded beside them.

Measures, with torch on --threads threads (default 2):
  (a) model load time, with the de-quantised copy of the embedded model already cached;
  (b) the key statistics step for the edited layers (default 4-8) on WikiText-2 valid,
      computed for real in a fresh, temporary COMEBA_HOME;
  (c) seconds per edit for one batch of CounterFact records (dev 0..n-1), split into
      target values / writing the layers / adapting alpha / the rest;
  (d) the state's tensor file size after one and after two batches (must be equal;
      the small JSON config beside it is reported too, its length varies with its numbers);
  (e) greedy generation speed (tokens/s) on 5 prompts x 32 new tokens, without and
      with the hooks attached, and which of those (unrelated) answers the hooks changed;
  (f) a full checksum of the base weights before and after everything (must be equal).

Writes --out (default benchmarks/results/core/core.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from machine import cpu_model, git_commit  # noqa: E402 (benchmarks/ is sys.path[0])

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_STATS_TEXT = SHARED / "wikitext-2" / "valid.txt"
DEFAULT_COUNTERFACT = SHARED / "counterfact" / "counterfact-dev.json"
GEN_PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a",
    "The best way to learn a new language is",
    "In 1969, the first human",
    "Water boils at a temperature of",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--stats-text", default=str(DEFAULT_STATS_TEXT), help="statistics text (default: WikiText-2 valid)")
    p.add_argument("--stats-tokens", type=int, default=100_000, help="tokens for the key statistics (default 100000)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="edited layers (default: hparams, 4-8)")
    p.add_argument("--counterfact", default=str(DEFAULT_COUNTERFACT), help="CounterFact file (flat/EasyEdit layout)")
    p.add_argument("--n-edits", type=int, default=10, help="records per batch (default 10: dev 0-9, then 10-19)")
    p.add_argument("--gen-tokens", type=int, default=32, help="new tokens per generation prompt (default 32)")
    p.add_argument("--repeats", type=int, default=2, help="timed generation passes per condition; the best is kept")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "core" / "core.json"),
                   help="JSON output file (default benchmarks/results/core/core.json)")
    return p.parse_args(argv)


@contextmanager
def timed(into: dict, key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        into[key] = into.get(key, 0.0) + time.perf_counter() - start


def state_bytes(path: Path) -> tuple[int, int]:
    """(tensor files' bytes, config bytes) of a saved state; the config's length varies with its numbers."""
    from comeba.adapter import ADAPTER_CONFIG

    tensors = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return tensors, (path / ADAPTER_CONFIG).stat().st_size


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


@torch.no_grad()
def generate_pass(model, tokenizer, prompts, n_tokens: int) -> tuple[float, int, list[str]]:
    """Greedy generation of exactly n_tokens per prompt, one prompt at a time: (seconds, tokens, texts)."""
    from comeba.models import input_device
    from comeba.text import encode_prompt

    device = input_device(model)
    texts, tokens = [], 0
    start = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n_tokens, min_new_tokens=n_tokens, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:]
        tokens += int(new.numel())
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return time.perf_counter() - start, tokens, texts


def main(argv=None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0]  # other work on the machine makes every timing slower
    torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    import comeba.editor as editor_mod
    from comeba import __version__
    from comeba.data import load_counterfact
    from comeba.editor import Editor
    from comeba.hparams import HParams
    from comeba.embedded import comeba_home, resolve_model_path
    from comeba.models import detect_layout, fingerprint, load_model, weights_checksum
    from comeba.stats import load_or_compute_stats
    from comeba.corpus import text_corpus

    for path, what in ((args.stats_text, "--stats-text"), (args.counterfact, "--counterfact")):
        if not Path(path).is_file():
            sys.exit(f"bench_core: {what} {path!r} does not exist")
    results: dict = {}

    # (a) model load, with the de-quantised embedded copy cached (built first if missing).
    home = comeba_home()
    with timed(results, "model_prepare_s"):
        resolve_model_path(args.model)
    with timed(results, "model_load_s"):
        model, tokenizer = load_model(args.model)
    layout = detect_layout(model)
    n_params = sum(p.numel() for p in model.parameters())
    checksum_before = weights_checksum(model)

    hp = HParams(mom2_n_tokens=args.stats_tokens)
    if args.layers:
        hp = hp.replace(layers=sorted(set(args.layers)))
    corpus = text_corpus([args.stats_text])
    requests = load_counterfact(args.counterfact, offset=0, n=2 * args.n_edits).requests
    if len(requests) < 2 * args.n_edits:
        sys.exit(f"bench_core: only {len(requests)} usable CounterFact records in 0..{2 * args.n_edits - 1}")
    batch1, batch2 = requests[: args.n_edits], requests[args.n_edits :]

    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        tmp = Path(tmp)
        # (b) statistics, for real: a fresh COMEBA_HOME (the model stays cached in the usual one).
        old_home = os.environ.get("COMEBA_HOME")
        os.environ["COMEBA_HOME"] = str(tmp / "home")
        try:
            fp = fingerprint(model)
            with timed(results, "stats_s"):
                _, provenance = load_or_compute_stats(model, tokenizer, layout, hp.layers, corpus, hp.mom2_n_tokens,
                                                      hp.mom2_dtype, model_fp=fp, progress=False)
            stats_tokens = next(iter(provenance["layers"].values()))["n_tokens"]
            assert not any(m.get("cached") for m in provenance["layers"].values()), "statistics came from a cache"
            # Editor() now finds the statistics in the cache: what is left is the context templates.
            with timed(results, "editor_create_s"):
                editor = Editor(model, tokenizer, hp, corpus=corpus, progress=False)
        finally:
            if old_home is None:
                os.environ.pop("COMEBA_HOME", None)
            else:
                os.environ["COMEBA_HOME"] = old_home

        # (c) one batch, with the three stages of Editor.edit timed by wrapping them.
        stages: dict = {}
        originals = {name: getattr(editor_mod, name) for name in ("target_values", "write_layers", "batch_gate_maxima")}

        def wrap(name, fn):
            def inner(*a, **k):
                with timed(stages, name):
                    return fn(*a, **k)
            return inner

        for name, fn in originals.items():
            setattr(editor_mod, name, wrap(name, fn))
        try:
            info1 = editor.edit(batch1)
            stages1 = dict(stages)
            stages.clear()
            # (d) state size after one batch, then after a second one.
            state = tmp / "state"
            with timed(results, "save_s"):
                editor.save_pretrained(state)
            size1, config1 = state_bytes(state)
            info2 = editor.edit(batch2)
            stages2 = dict(stages)
        finally:
            for name, fn in originals.items():
                setattr(editor_mod, name, fn)
        editor.save_pretrained(state)
        size2, config2 = state_bytes(state)
        n_files = len(list(state.iterdir()))

    # (e) generation without and with the hooks (interleaved, best of --repeats each).
    generate_pass(model, tokenizer, GEN_PROMPTS[:1], 4)  # warm-up
    gen = {"plain": [], "hooked": []}
    texts = {}
    for _ in range(max(1, args.repeats)):
        s, n, texts["plain"] = generate_pass(model, tokenizer, GEN_PROMPTS, args.gen_tokens)
        gen["plain"].append((s, n))
        with editor.applied():
            s, n, texts["hooked"] = generate_pass(model, tokenizer, GEN_PROMPTS, args.gen_tokens)
        gen["hooked"].append((s, n))
    tps = {k: max(n / s for s, n in v) for k, v in gen.items()}
    same = sum(a == b for a, b in zip(texts["plain"], texts["hooked"]))
    changed = [{"prompt": p, "plain": a, "hooked": b}
               for p, a, b in zip(GEN_PROMPTS, texts["plain"], texts["hooked"]) if a != b]

    # (f) the base weights after editing and generating.
    checksum_after = weights_checksum(model)

    def per_stage(st: dict, info: dict) -> dict:
        known = sum(st.values())
        return {"target_values_s": round(st.get("target_values", 0.0), 3),
                "write_layers_s": round(st.get("write_layers", 0.0), 3),
                "adapt_alpha_s": round(st.get("batch_gate_maxima", 0.0), 3),
                "other_s": round(info["seconds"] - known, 3)}

    report = {
        "benchmark": "bench_core",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "environment": {
            "comeba": __version__, "git": git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average_1min_at_start": round(load_at_start, 2),
        },
        "model": {"name": args.model, "layout": layout.name, "parameters": n_params,
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "cache": str(home)},
        "load": {"prepare_s": round(results["model_prepare_s"], 3), "load_cached_s": round(results["model_load_s"], 3)},
        "statistics": {"layers": list(hp.layers), "corpus": corpus.describe, "tokens_requested": args.stats_tokens,
                       "tokens": stats_tokens, "seconds": round(results["stats_s"], 3),
                       "tokens_per_s": round(stats_tokens / results["stats_s"], 1),
                       "editor_create_after_s": round(results["editor_create_s"], 3)},
        "edit": {
            "records": f"counterfact dev 0-{args.n_edits - 1}, then {args.n_edits}-{2 * args.n_edits - 1}",
            "batch_size": args.n_edits,
            "batch1_s": round(info1["seconds"], 3), "batch1_s_per_edit": round(info1["seconds"] / len(batch1), 3),
            "batch1_stages": per_stage(stages1, info1),
            "batch2_s": round(info2["seconds"], 3), "batch2_s_per_edit": round(info2["seconds"] / len(batch2), 3),
            "batch2_stages": per_stage(stages2, info2),
            "alpha_after": {str(l): round(a, 4) for l, a in info2["alpha"].items()},
        },
        "state": {"tensor_bytes_after_batch1": size1, "tensor_bytes_after_batch2": size2, "equal": size1 == size2,
                  "config_bytes_after_batch1": config1, "config_bytes_after_batch2": config2,
                  "files": n_files, "edits": editor.n_edits, "save_s": round(results["save_s"], 3)},
        "generation": {"prompts": len(GEN_PROMPTS), "new_tokens": args.gen_tokens, "repeats": args.repeats,
                       "tokens_per_s_plain": round(tps["plain"], 2), "tokens_per_s_hooked": round(tps["hooked"], 2),
                       "hooked_over_plain": round(tps["hooked"] / tps["plain"], 3),
                       "same_text_with_hooks": f"{same}/{len(GEN_PROMPTS)}", "changed_by_hooks": changed},
        "weights": {"sha256_before": checksum_before, "sha256_after": checksum_after,
                    "unchanged": checksum_before == checksum_after},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    e, g = report["edit"], report["generation"]
    rows = [
        ("model load (cached)", f"{report['load']['load_cached_s']:.2f} s"),
        (f"statistics, layers {hp.layers[0]}-{hp.layers[-1]}, {stats_tokens} tokens",
         f"{report['statistics']['seconds']:.1f} s ({report['statistics']['tokens_per_s']:.0f} tok/s)"),
        ("editor create (stats cached)", f"{report['statistics']['editor_create_after_s']:.2f} s"),
        (f"batch 1 ({args.n_edits} edits)", f"{e['batch1_s_per_edit']:.2f} s/edit ({e['batch1_s']:.1f} s)"),
        ("  target values / write layers / alpha / other",
         " / ".join(f"{v:.2f}" for v in e["batch1_stages"].values()) + " s"),
        (f"batch 2 ({args.n_edits} edits, consecutive)", f"{e['batch2_s_per_edit']:.2f} s/edit ({e['batch2_s']:.1f} s)"),
        ("  target values / write layers / alpha / other",
         " / ".join(f"{v:.2f}" for v in e["batch2_stages"].values()) + " s"),
        (f"state tensors after {args.n_edits} / {2 * args.n_edits} edits",
         f"{size1} / {size2} bytes = {size2 / 2**20:.2f} MiB ({'equal' if size1 == size2 else 'DIFFERENT'}; "
         f"+ {config2} bytes of JSON config)"),
        (f"generation {len(GEN_PROMPTS)} x {args.gen_tokens} tokens, no hooks", f"{g['tokens_per_s_plain']:.1f} tok/s"),
        ("generation with hooks", f"{g['tokens_per_s_hooked']:.1f} tok/s (x{g['hooked_over_plain']:.2f}; "
                                  f"same text {g['same_text_with_hooks']})"),
        ("base weights sha256 unchanged", str(report["weights"]["unchanged"])),
        ("peak RSS", f"{report['peak_rss_mb']:.0f} MB"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"comeba bench_core — {args.model}, {torch.get_num_threads()} threads, {report['environment']['cpu']}, "
          f"load average {load_at_start:.2f} at start")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")
    print(f"written to {out}")
    ok = size1 == size2 and report["weights"]["unchanged"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
