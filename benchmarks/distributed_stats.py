"""The key statistics of the embedded model on one process and on two (torchrun, gloo): the same numbers?

    python benchmarks/distributed_stats.py                  # 50,000 WikiText-2 valid tokens, layers 4-8
    python benchmarks/distributed_stats.py --tokens 100000

Runs `comeba stats` once as one process and once under `torchrun --nproc-per-node 2` (one torch thread per
process in both, each into its own empty COMEBA_HOME), then loads the two caches and prints, per layer, the
maximum relative difference |C2 − C1| / max |C1| and the token counts, and both wall times. Writes --out
(default benchmarks/results/distributed_stats/distributed_stats.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def run(cmd: list[str], home: Path, threads: int) -> float:
    env = {**os.environ, "COMEBA_HOME": str(home), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_stats" / "distributed_stats.json"))
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file

    stats = ["stats", "--stats-text", str(TEXT), "--stats-tokens", str(args.tokens), "--device", "cpu", "--quiet"]
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        t1 = run([sys.executable, "-m", "comeba", *stats], one, 1)
        t2 = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
                  "2", "-m", "comeba", *stats], two, 1)
        files1 = sorted(p.relative_to(one) for p in (one / "stats").rglob("*.safetensors"))
        files2 = sorted(p.relative_to(two) for p in (two / "stats").rglob("*.safetensors"))
        assert files1 == files2 and files1, (files1, files2)  # the same cache keys
        layers = {}
        for rel in files1:
            a, b = load_file(str(one / rel))["mom2"].double(), load_file(str(two / rel))["mom2"].double()
            m1 = json.loads((one / rel).with_suffix(".json").read_text())
            m2 = json.loads((two / rel).with_suffix(".json").read_text())
            layers[m1["layer"]] = {"max_rel_diff": float((a - b).abs().max() / a.abs().max()),
                                   "tokens": [m1["n_tokens"], m2["n_tokens"]], "world_size": [m1["world_size"],
                                                                                            m2["world_size"]]}
    result = {"model": "embedded", "text": "wikitext-2 valid", "tokens_requested": args.tokens,
              "torch_threads_per_process": 1, "seconds_one_process": round(t1, 1),
              "seconds_two_processes": round(t2, 1), "layers": layers, "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
