"""Soak: 1,000 consecutive one-edit batches on a tiny model — memory, state size and time per batch stay flat.

    python benchmarks/soak.py                       # 1,000 batches, tiny Llama, span gate
    python benchmarks/soak.py --batches 200 --gate reference

Every --window batches the state is saved (to a temporary folder) and the
window's resident memory (RSS, from /proc), the bytes of the state's tensor
files (and of its JSON config, whose numbers change length) and the mean
seconds per batch are recorded. The figures compare the mean of the last five
windows with that of the first five after warm-up (ratios, from one run). Writes --out
(default benchmarks/results/soak/soak-<gate>.json).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from comeba.corpus import text_corpus  # noqa: E402
from comeba.editor import Editor  # noqa: E402
from comeba.hparams import HParams  # noqa: E402
from tiny import WIKITEXT_VALID, make_model, make_tokenizer  # noqa: E402

NAMES = ["Anna", "Boris", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas"]
PLACES = ["Paris", "Berlin", "Rome", "Madrid", "Vienna", "Prague", "Lisbon", "Oslo", "Athens", "Dublin"]


def rss_mb() -> float:
    """Resident memory after a garbage collection and glibc's malloc_trim, so that what is counted is what is
    held, not what the allocator keeps cached (which swings by ±5 % from window to window)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def folder_bytes(path: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.endswith(suffix))


def request(i: int) -> dict:
    """A distinct fact per batch: person i (a name and a number) lives in a city."""
    subject = f"{NAMES[i % 10]} {i}"
    return {"prompt": f"The home town of {subject} is", "subject": subject, "target_new": PLACES[(i * 7) % 10]}


def soak(batches: int, window: int, gate: str, progress: bool = True) -> dict:
    """Run the soak; the windows' figures and the last window over the first after warm-up."""
    torch.set_num_threads(1)
    tok = make_tokenizer()
    model = make_model("llama", tok)
    hp = HParams(layers=[1, 2], v_num_grad_steps=5, mom2_n_tokens=2000, context_template_prefixes=["The"],
                 context_template_length=6, gate=gate, mom2_update_weight=100.0)
    corpus = text_corpus([WIKITEXT_VALID]) if Path(WIKITEXT_VALID).is_file() else None
    editor = Editor(model, tok, hp, corpus=corpus, progress=False)
    windows, t_window = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        for i in tqdm(range(batches), desc="soak", unit="batch", disable=not progress):
            t = time.perf_counter()
            editor.edit([request(i)])
            t_window += time.perf_counter() - t
            if (i + 1) % window == 0:
                editor.save_pretrained(state)
                windows.append({"batches": i + 1, "seconds_per_batch": round(t_window / window, 4),
                                "rss_mb": round(rss_mb(), 1), "state_bytes": folder_bytes(state, ".safetensors"),
                                "config_bytes": folder_bytes(state, ".json")})
                t_window = 0.0
    # the mean of the first five windows after the first (warm-up) against the mean of the last five
    k = max(1, min(5, (len(windows) - 1) // 2))
    first, last = windows[1:1 + k] or windows[:1], windows[-k:]
    ratios = {key: round(sum(w[key] for w in last) / sum(w[key] for w in first), 4)
              for key in ("seconds_per_batch", "rss_mb", "state_bytes")}
    return {"gate": gate, "batches": batches, "window": window, "model": "tiny llama (4 layers)",
            "torch_threads": 1, "compared": [[w["batches"] for w in first], [w["batches"] for w in last]],
            "last_over_first": ratios, "windows": windows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=1000)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--gate", choices=["span", "reference"], default="span")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = soak(args.batches, args.window, args.gate)
    out = Path(args.out or ROOT / "benchmarks" / "results" / "soak" / f"soak-{args.gate}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "windows"}))


if __name__ == "__main__":
    main()
