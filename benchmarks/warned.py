"""A finished comeba run's final means on the records `comeba edit` warns about, and on the others, apart.

    python benchmarks/warned.py RUN [RUN ...]      # a `comeba eval` folder of comeba on counterfact-scale.json

`comeba eval` records these warnings itself (summary.json "warned", records.jsonl "warned") since they
were added; this script gives the same split for a run from before. The warnings depend on the unedited
model alone (a subject that is its prompt's first token; a subject key at the first edited layer, below
every hook, whose energy whitened against λC0 is under half of general text's), so they are asked here
of a fresh editor with the run's hyperparameters and WikiText-2 statistics, in the run's batches. Writes
RUN/warned.json (the record indices, the warnings, and the two sets of means) and prints the split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from comeba.corpus import text_corpus
from comeba.data import load_counterfact
from comeba.editor import Editor
from comeba.hparams import HParams
from comeba.models import load_model
from comeba.reporting import format_core
from comeba.runfolder import warned_split
from comeba.scoring import aggregate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SCALE = DATA / "counterfact" / "counterfact-scale.json"
STATS = DATA / "wikitext-2" / "valid.txt"


def split(run: Path, model, tokenizer) -> dict:
    """The run's warned records and its final means on them, on the others and on all."""
    config = json.loads((run / "run.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    if config["method"] != "comeba" or config["protocol"] != "consecutive":
        raise SystemExit(f"{run}: a consecutive comeba run is needed, this is {config['method']} {config['protocol']}")
    if not str(summary.get("data", "")).endswith("counterfact-scale.json"):
        raise SystemExit(f"{run}: not a run on counterfact-scale.json ({summary.get('data')})")
    editor = Editor(model, tokenizer, config=HParams(**config["hparams"]), corpus=text_corpus([STATS]), progress=False)
    requests = load_counterfact(SCALE, offset=summary.get("offset", 0), n=config["n_edits"]).requests
    size = config["batch_size"]
    warned: dict[int, str] = {}
    with torch.no_grad():
        for lo in range(0, len(requests), size):
            for i, w in editor.request_warnings(requests[lo: lo + size]):  # as `Editor.edit` asks
                warned[lo + i] = w.split(": ", 1)[1]
    posts = [json.loads(line)["post"] for line in (run / "records.jsonl").read_text().splitlines()]
    if len(posts) != len(requests):
        raise SystemExit(f"{run}: {len(posts)} records in records.jsonl, {len(requests)} requested")
    out = {**warned_split(posts, warned), "warnings": {str(i): w for i, w in sorted(warned.items())},
           "post_all": aggregate(posts), "n_records": len(posts)}
    (run / "warned.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("embedded")
    for run in args.runs:
        out = split(run, model, tokenizer)
        print(f"{run}: {len(out['records'])} of {out['n_records']} "
              f"records warned about; reliability / generality / locality {format_core(out['post'])} on them, "
              f"{format_core(out['post_others'])} on the others, {format_core(out['post_all'])} on all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
