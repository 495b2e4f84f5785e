"""Gate diagnostics: where the gate opens, and what the hooks cost free text.

Three measurements of an edited model, per edited layer where a gate exists:

- the *false-open rate*: the share of tokens of a fixed sample of general
  text (not the statistics corpus) on which the gate opens — text that is
  not about any edit, so every opening is a leak;
- the *subject open rate*: the share of edited subjects' last tokens on
  which it opens, in the edit prompts and in their rephrasings — where it
  must open for the edit to act;
- the *perplexity* of the same general text with the hooks on, against the
  unedited model's: general ability on free text rather than on a few
  hundred prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .hooks import HookLayers
from .models import input_device
from .requests import Request, RequestError, make_template
from .corpus import paragraphs_from_files
from .text import encode_prompt, pad_batch, subject_last_index

MIN_PARAGRAPH_CHARS = 200


@dataclass(frozen=True)
class TextSample:
    """Token ids of general text, one list per sequence, and where they came from."""

    ids: tuple[tuple[int, ...], ...]
    describe: str

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.ids)


def general_text_sample(tokenizer, path: str | Path, n_sequences: int = 100, seq_len: int = 64) -> TextSample:
    """The first `seq_len` tokens of the first `n_sequences` long paragraphs of a text file (headings skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"diagnostics text {str(path)!r} does not exist")
    seqs = []
    for line in paragraphs_from_files([str(path)]):  # the statistics' reader: headings and blank lines skipped
        if len(line) < MIN_PARAGRAPH_CHARS:
            continue
        seqs.append(tuple(encode_prompt(tokenizer, line)[:seq_len]))
        if len(seqs) == n_sequences:
            break
    if not seqs:
        raise ValueError(f"diagnostics text {str(path)!r} holds no paragraph of {MIN_PARAGRAPH_CHARS}+ characters")
    return TextSample(tuple(seqs), f"{path.name}: {len(seqs)} paragraphs × ≤ {seq_len} tokens")


@torch.no_grad()
def text_pass(model, tokenizer, sample: TextSample, hooks: HookLayers | None = None,
              batch_size: int = 16) -> dict[str, object]:
    """Perplexity of `sample` under the model as it runs, and (with `hooks`) each gate's open rate in percent."""
    device = input_device(model)
    nll, count, opened, valid_total = 0.0, 0, {}, 0
    if hooks is not None:
        hooks.record(True)
    try:
        for start in range(0, len(sample.ids), batch_size):
            ids, mask = pad_batch(sample.ids[start : start + batch_size], tokenizer.pad_token_id, device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            both = (mask[:, 1:] * mask[:, :-1]).bool()
            nll -= float(logp[both].sum())
            count += int(both.sum())
            valid = mask.bool()
            valid_total += int(valid.sum())
            for layer, rec in (hooks.records or {}).items() if hooks is not None else ():
                opened[layer] = opened.get(layer, 0) + int((rec.gate & valid).sum())
    finally:
        if hooks is not None:
            hooks.record(False)
    out: dict[str, object] = {"perplexity": float(torch.tensor(nll / max(count, 1)).exp()), "tokens": valid_total}
    if hooks is not None:
        out["open"] = {l: 100.0 * opened.get(l, 0) / max(valid_total, 1) for l in sorted(hooks.weights)
                       if hooks.gated[l]}
    return out


def subject_items(tokenizer, requests: Sequence[Request]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(text, subject's last token) of each edit prompt, and of each rephrasing that holds the subject once."""
    edits = [(r.text, subject_last_index(tokenizer, r.prompt, r.subject)) for r in requests]
    rephrases = []
    for r in requests:
        for p in r.rephrase_prompts:
            try:
                template = make_template(p, r.subject)
            except RequestError:
                continue
            rephrases.append((p, subject_last_index(tokenizer, template, r.subject)))
    return edits, rephrases


@torch.no_grad()
def subject_gates(model, tokenizer, hooks: HookLayers, items: Sequence[tuple[str, int]],
                  batch_size: int = 32) -> dict[int, torch.Tensor]:
    """Per gated layer, whether the gate opens at each item's position ((text, position) pairs, as
    `subject_items` gives them): a bool vector over the items, on the CPU."""
    device = input_device(model)
    opened: dict[int, list[torch.Tensor]] = {}
    hooks.record(True)
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            ids, mask = pad_batch([encode_prompt(tokenizer, t) for t, _ in chunk], tokenizer.pad_token_id, device)
            model(input_ids=ids, attention_mask=mask)
            rows = torch.arange(len(chunk), device=device)
            idx = torch.tensor([i for _, i in chunk], device=device)
            for layer, rec in hooks.records.items():
                opened.setdefault(layer, []).append(rec.gate[rows, idx].bool().cpu())
    finally:
        hooks.record(False)
    return {l: torch.cat(v) for l, v in opened.items()}


def subject_open_rates(model, tokenizer, hooks: HookLayers, requests: Sequence[Request],
                       batch_size: int = 32) -> dict[str, dict[int, float]]:
    """Per layer, the share (percent) of edited subjects' last tokens where the gate opens: edit prompts, rephrasings."""
    out: dict[str, dict[int, float]] = {}
    for kind, items in zip(("edit", "rephrase"), subject_items(tokenizer, requests)):
        if not items:
            continue
        opened = subject_gates(model, tokenizer, hooks, items, batch_size)
        out[kind] = {l: 100.0 * int(opened[l].sum()) / len(items) if l in opened else 0.0
                     for l in sorted(hooks.weights) if hooks.gated[l]}
    return out


def gate_report(model, tokenizer, sample: TextSample, hooks: HookLayers | None, requests: Sequence[Request],
                reference_perplexity: float) -> dict[str, object]:
    """One checkpoint's diagnostics, flat (for the CSV): false_open_L / subject_open_L / rephrase_open_L in
    percent, their worst case over layers, perplexity and its ratio to the unedited model's."""
    text = text_pass(model, tokenizer, sample, hooks)
    row: dict[str, object] = {"perplexity": round(float(text["perplexity"]), 4),
                              "perplexity_ratio": round(float(text["perplexity"]) / reference_perplexity, 5)}
    if hooks is not None:
        opened = text["open"]
        for l, v in opened.items():
            row[f"false_open_{l}"] = round(v, 4)
        row["false_open_max"] = round(max(opened.values()), 4) if opened else None
        for kind, rates in subject_open_rates(model, tokenizer, hooks, requests).items():
            for l, v in rates.items():
                row[f"{kind}_open_{l}"] = round(v, 3)
            row[f"{kind}_open_min"] = round(min(rates.values()), 3) if rates else None
    return row
