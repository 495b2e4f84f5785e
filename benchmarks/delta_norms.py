"""How large an update each target-value optimiser writes: ‖ΔW‖ per layer after one batch, same records, same state.

    python benchmarks/delta_norms.py                     # CounterFact dev records 0–19, one batch
    python benchmarks/delta_norms.py --offset 200 --n 20

All methods share the target-value optimisation, and the speed work changed it
(L-BFGS and bfloat16 values in place of the reference Adam schedule in
float32). A larger update at the same reliability is carried by an ungated
method onto unrelated prompts, so the baselines' locality depends on it. Two
editors start from the same statistics and write the same batch: the default
hyperparameters, and `v_optimizer: adam, v_dtype: float32`. Prints and writes
OUT/delta_norms.json (OUT: benchmarks/results/delta_norms by default).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

import comeba
from comeba.data import load_counterfact
from machine import cpu_model, git_commit  # noqa: E402 (benchmarks/ is sys.path[0])

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# The reference optimiser's settings live in one file, shared with scale.py and run_table.py --hparams.
REFERENCE_OPTIMISER = ROOT / "benchmarks" / "hparams" / "reference-optimiser.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-dev.json"))
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--stats-text", default=str(DATA / "wikitext-2" / "valid.txt"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "delta_norms"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = comeba.load_model("embedded")
    requests = load_counterfact(args.data, args.offset, args.n).requests
    corpus = comeba.text_corpus([args.stats_text])
    settings = {"default": {}, "reference optimiser (adam, float32)": yaml.safe_load(REFERENCE_OPTIMISER.read_text())}
    rows = []
    for name, overrides in settings.items():
        editor = comeba.Editor(model, tok, config=comeba.HParams(**overrides), corpus=corpus)
        start = time.perf_counter()
        editor.edit(requests)
        norms = {str(layer): round(float(state.delta.float().norm()), 3) for layer, state in editor.layers.items()}
        rows.append({"setting": name, "hparams": overrides, "seconds": round(time.perf_counter() - start, 1),
                     "delta_norm": norms})
        print(f"{name}: ‖ΔW‖ per layer {norms}", flush=True)
        editor.detach()
    ratio = {layer: round(rows[0]["delta_norm"][layer] / rows[1]["delta_norm"][layer], 3) for layer in rows[0]["delta_norm"]}
    print(f"default / reference optimiser: {ratio}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "delta_norms", "commit": git_commit(), "cpu": cpu_model(), "threads": args.threads,
              "data": args.data, "offset": args.offset, "n": len(requests), "rows": rows, "ratio_default_to_reference": ratio}
    (out / "delta_norms.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
