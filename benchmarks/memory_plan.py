"""The memory plan (comeba.plan) against what one batch really takes, on the CPU.

    python benchmarks/memory_plan.py                 # the embedded model, one batch of 10 CounterFact edits
    python benchmarks/memory_plan.py --n 4 --out /tmp/plan.json   # smaller

Measures, on the embedded model (float32, CPU, cached WikiText-2 statistics):
  (a) the plan's state figures against the bytes of the tensors of a saved state, and its peaks of computing
      fresh statistics (5,000 tokens, in a temporary cache) and of starting an editor against the RSS;
  (b) the peak RSS increase of each stage of one batch (target values, writing the layers, the gate's
      calibration) and of the whole batch, over the RSS when the batch starts (the weights and the state),
      against the plan's figures: with its default prompt sizes, and with this batch's real ones;
  (c) whether C_accu could be stored in float32: 100 batches of 20 synthetic keys drawn from the real C0
      of the first edited layer, accumulated in float64 and in float32, then ΔW and the span gate's scores;
  (d) the plan of a 7B-class Llama (hidden 4096, MLP 14336, 32 layers, vocabulary 128256, bfloat16) with
      five edited layers and a batch of 100 (the README's table), from its config alone.

The process runs with MALLOC_MMAP_THRESHOLD_=65536 (it re-executes itself), so that freed tensors leave
the RSS at once; the weights are read once first (they may be mapped from their file and enter the RSS only
when touched); the peak RSS is reset (/proc/self/clear_refs) before each measurement. Writes --out (default
benchmarks/results/memory_plan/plan.json).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 8192, "tie_word_embeddings": False, "dtype": "bfloat16"}


def rss() -> tuple[int, int]:
    """(current RSS, peak RSS) in bytes."""
    status = Path("/proc/self/status").read_text().split("\n")
    get = lambda key: next(int(l.split()[1]) * 1024 for l in status if l.startswith(key + ":"))  # noqa: E731
    return get("VmRSS"), get("VmHWM")


def reset_peak() -> int:
    """Give freed memory back, reset the peak RSS to the current one and return it."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return rss()[0]


class Stages:
    """Wraps the editor's three stages so that each one's peak RSS increase over the batch start is recorded."""

    def __init__(self):
        self.start = 0
        self.peaks: dict[str, int] = {}

    def wrap(self, module, name: str, label: str):
        inner = getattr(module, name)

        def wrapped(*args, **kwargs):
            before = rss()[0]
            Path("/proc/self/clear_refs").write_text("5")
            try:
                return inner(*args, **kwargs)
            finally:
                self.peaks[label] = rss()[1] - self.start
                self.peaks[label + " (over the stage's start)"] = rss()[1] - before

        setattr(module, name, wrapped)


def real_prompt_sizes(tokenizer, requests, templates) -> dict:
    """The target-value passes' real sizes: padded suffix tokens per sequence, prefix width, target tokens."""
    from comeba.values import _rewrite_sequences, length_groups

    seqs = _rewrite_sequences(tokenizer, requests, templates)
    suffix = [len(ids) - lk for ids, lk in zip(seqs.ids, seqs.lookup)]
    padded = sum(len(g) * max(suffix[i] for i in g) for g in length_groups(suffix))
    targets = [len(t) for t, kl in zip(seqs.targets, seqs.is_kl) if not kl]
    return {"suffix_tokens": max(1, round(padded / len(suffix))), "prefix_tokens": max(seqs.lookup),
            "target_tokens": max(1, round(sum(targets) / len(targets)))}


def c_accu_float32_check(c0, lam: float, batches: int = 100, per_batch: int = 20) -> list[dict]:
    """ΔW and the span gate from C_accu accumulated in float32 against float64, on keys drawn from C0."""
    import torch

    from comeba.compute import solve_update
    from comeba.gate import span_gate, span_scores

    torch.manual_seed(0)
    d = c0.shape[0]
    root = torch.linalg.cholesky(c0.double())
    draw = lambda n, s=2**0.5: (torch.randn(n, d, dtype=torch.float64) @ root.T) * s  # noqa: E731
    acc64, general = lam * c0.double(), draw(2000, 1.0).float()
    acc32 = acc64.float()
    out = [{"cond_c0": float(torch.linalg.cond(c0.double()))}]
    for batch in range(1, batches + 1):
        K = draw(per_batch)
        acc64, acc32 = acc64 + K.T @ K, acc32 + (K.T @ K).float()
        if batch in (1, 10, batches):
            R, new = torch.randn(per_batch, 64, dtype=torch.float64), draw(per_batch)
            d64, d32 = solve_update(R, new, acc64), solve_update(R, new, acc32.double())
            g64, g32 = span_gate(c0, acc64, lam), span_gate(c0, acc32.double(), lam)
            diff = lambda k: float((span_scores(k, g64) - span_scores(k, g32)).abs().max())  # noqa: E731
            out.append({"edits": batch * per_batch, "delta_rel_diff": float((d64 - d32).norm() / d64.norm()),
                        "general_score_max_diff": diff(general), "edited_score_max_diff": diff(K.float()),
                        "alpha_general_999": float(torch.quantile(span_scores(general, g64).double(), 0.999))})
    return out


def saved_bytes(editor) -> dict[str, int]:
    """Bytes of each tensor of the editor's saved state (without the calibration text)."""
    from safetensors import safe_open

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        editor.save_pretrained(tmp)
        for file in ("adapter_model.safetensors", "editor_state.safetensors"):
            with safe_open(str(Path(tmp) / file), "pt") as f:
                for key in f.keys():
                    if not key.startswith("calibration."):
                        t = f.get_tensor(key)
                        out[key] = t.numel() * t.element_size()
    return out


def stage_plans(plan, n: int, sizes: dict) -> dict[str, int]:
    """The plan's figure for each stage of a batch of `n` (on top of the weights and the state)."""
    from comeba.plan import _calibration_stage, _size, _values_stage, _write_stage

    b, hp = _size(plan.dtype), plan.hparams
    return {"target values": sum(_values_stage(plan.shape, hp, n, b, sizes["suffix_tokens"], sizes["prefix_tokens"],
                                               sizes["target_tokens"]).values()),
            "writing the layers": sum(_write_stage(plan.shape, hp, plan.layers, n, b, sizes["prefix_tokens"]).values()),
            "gate calibration": sum(_calibration_stage(plan.shape, hp, plan.layers, n, b).values())}


def statistics_peak(model, tokenizer, hp, corpus, tokens: int = 5000) -> int:
    """Peak RSS increase of computing fresh key statistics (in a temporary cache; the peak does not depend on
    the number of tokens, only on the layers and the batch shape)."""
    from comeba.models import detect_layout
    from comeba.stats import load_or_compute_stats

    before, home = reset_peak(), os.environ.get("COMEBA_HOME")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["COMEBA_HOME"] = tmp
        try:
            load_or_compute_stats(model, tokenizer, detect_layout(model), hp.layers, corpus, tokens, hp.mom2_dtype,
                                  model_fp="memory-plan-benchmark", progress=False)
        finally:
            os.environ.pop("COMEBA_HOME") if home is None else os.environ.__setitem__("COMEBA_HOME", home)
    return rss()[1] - before


def measure(args) -> dict:
    import torch

    import comeba.editor as editor_module
    from comeba import HParams, load_model
    from comeba.corpus import text_corpus
    from comeba.editor import Editor
    from comeba.inputs import read_dataset
    from comeba.plan import PREFIX_TOKENS, SUFFIX_TOKENS, TARGET_TOKENS, memory_plan

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    for tensor in (*model.parameters(), *model.buffers()):  # page in weights loaded lazily from a mapped file
        float(tensor.float().sum())
    hp, corpus = HParams(mom2_n_tokens=args.stats_tokens), text_corpus([args.stats_text])
    statistics = statistics_peak(model, tokenizer, hp, corpus)
    before = reset_peak()
    editor = Editor(model, tokenizer, hp, corpus=corpus, progress=False)  # statistics from the cache
    start = rss()[1] - before
    _, loaded = read_dataset(f"counterfact:{args.counterfact}", offset=args.offset, n=args.n)
    requests, n = loaded.requests, len(loaded.requests)
    stages = Stages()
    for name, label in (("target_values", "target values"), ("write_layers", "writing the layers"),
                        ("calibrate_span", "gate calibration")):
        stages.wrap(editor_module, name, label)
    stages.start = reset_peak()
    started = time.perf_counter()
    editor.edit(requests)
    seconds = time.perf_counter() - started
    measured = {k: v for k, v in stages.peaks.items() if "(over" not in k}
    # Each stage resets the peak at its start: the batch's peak is the largest of theirs (and of what followed).
    batch_peak = max(rss()[1] - stages.start, *measured.values())

    saved = saved_bytes(editor)
    inference = sum(v for k, v in saved.items() if k.endswith((".delta", ".gate.whiten", ".gate.span")))
    real_sizes = real_prompt_sizes(tokenizer, editor_module.make_requests(requests), editor.templates)
    default_sizes = {"suffix_tokens": SUFFIX_TOKENS, "prefix_tokens": PREFIX_TOKENS, "target_tokens": TARGET_TOKENS}
    result = {"model": args.model, "n_edits": n, "threads": args.threads, "batch_seconds": round(seconds, 1),
              "prompt_sizes": {"default": default_sizes, "real": real_sizes}}
    default = memory_plan(model, hp, n)
    result["state"] = {"plan_inference": default.state_inference, "plan_editing": default.state_editing,
                       "saved_inference": inference, "saved_editing": sum(saved.values()) - inference,
                       "equal": default.state_inference == inference and default.state == sum(saved.values())}
    result["batch"] = {"measured_peak_rss_increase": batch_peak}
    result["stages"] = {"measured": measured, "measured_over_stage_start": {
        k.split(" (")[0]: v for k, v in stages.peaks.items() if "(over" in k}}
    for key, sizes in (("default", default_sizes), ("real", real_sizes)):
        plan = memory_plan(model, hp, n, **sizes)
        extra = sum(plan.phases["batch"].parts.values())
        result["batch"].update({f"plan_{key}_sizes": extra, f"ratio_{key}": round(extra / batch_peak, 2)})
        figures = stage_plans(plan, n, sizes)
        result["stages"][f"plan_{key}_sizes"] = figures
        result["stages"][f"ratio_{key}"] = {k: round(figures[k] / v, 2) for k, v in measured.items() if v > 0}
    result["phases"] = {"statistics": {"measured": statistics,
                                       "plan": default.phases["statistics"].peak - default.weights},
                        "start": {"measured": start, "plan": default.phases["start"].peak - default.weights}}
    for phase in result["phases"].values():
        phase["ratio"] = round(phase["plan"] / phase["measured"], 2)
    result["c_accu_float32"] = c_accu_float32_check(editor.layers[hp.layers[0]].c0, hp.mom2_update_weight)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--stats-text", default=str(SHARED / "wikitext-2" / "valid.txt"))
    p.add_argument("--stats-tokens", type=int, default=100_000, help="(cached after the first run)")
    p.add_argument("--counterfact", default=str(SHARED / "counterfact" / "counterfact-dev.json"))
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--n", type=int, default=10, help="edits in the batch (default 10)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_plan" / "plan.json"))
    args = p.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

    import torch
    import transformers
    from machine import cpu_model, git_commit  # benchmarks/ is sys.path[0]
    from transformers import AutoConfig

    from comeba import HParams
    from comeba.plan import memory_plan
    from comeba.reporting import format_plan

    llama = memory_plan(AutoConfig.for_model(**LLAMA_7B), HParams(), 100, "bfloat16", 80 * 2**30)

    result = {"benchmark": "memory_plan", "command": " ".join(["memory_plan.py", *sys.argv[1:]]),
              "environment": {"git": git_commit(), "cpu": cpu_model(), "torch": torch.__version__,
                              "transformers": transformers.__version__},
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "llama_7b": {"config": LLAMA_7B, "batch_size": 100,
                                                                         "table": format_plan(llama)},
              **measure(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "llama_7b"}, indent=2, ensure_ascii=False))
    print(result["llama_7b"]["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
