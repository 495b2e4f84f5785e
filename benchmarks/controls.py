"""Do unrelated prompts keep their exact greedy continuation under a saved state's hooks?

    comeba edit --edits EDITS.json --batch-size 20 --state DIR --stats-text ../shared/data/wikitext-2/valid.txt
    python benchmarks/controls.py DIR [--tokens 20] [--out benchmarks/results/controls/NAME.json]

The control prompts are the `locality_prompt`s of examples/edits.json (the README
demo's unrelated prompts). For each: the greedy continuation of the unedited
model and with the state's hooks, and whether any gate opened on its tokens.
Results kept in the repository go to benchmarks/results/controls/ (the README's
200-edit figure: controls-dev200.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from comeba.adapter import read_config  # noqa: E402
from comeba.editor import Editor, greedy_generate  # noqa: E402
from comeba.models import load_model  # noqa: E402
from comeba.text import encode_prompt  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("state")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    config = read_config(args.state)
    model, tok = load_model(config["base_model"]["name_or_path"] or "embedded")
    editor = Editor.from_pretrained(model, tok, args.state, progress=False)
    prompts = [r["locality_prompt"] for r in json.loads((ROOT / "examples" / "edits.json").read_text())]
    before = greedy_generate(model, tok, prompts, args.tokens)
    rows = []
    with editor.applied():
        after = greedy_generate(model, tok, prompts, args.tokens)
        editor.hooks.record(True)
        for p, b, a in zip(prompts, before, after):
            with torch.no_grad():
                model(input_ids=torch.tensor([encode_prompt(tok, p + b)]))
            opened = {l: int(r.gate.sum()) for l, r in editor.hooks.records.items()}
            rows.append({"prompt": p, "before": b, "after": a, "unchanged": a == b,
                         "gate_opened_tokens_on_prompt_and_original_continuation": opened})
        editor.hooks.record(False)
    kept = sum(r["unchanged"] for r in rows)
    summary = {"state": args.state, "n_edits": editor.n_edits, "gate": editor.hparams.gate,
               "tokens": args.tokens, "unchanged": kept, "of": len(rows), "controls": rows}
    for r in rows:
        print(("same   " if r["unchanged"] else "CHANGED"), repr(r["prompt"]), "→", repr(r["after"]),
              "" if r["unchanged"] else f"(was {r['before']!r})")
    print(f"{kept} of {len(rows)} control prompts keep their {args.tokens}-token greedy continuation "
          f"after {editor.n_edits} edits ({editor.hparams.gate} gate)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
