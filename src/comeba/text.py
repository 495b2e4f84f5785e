"""Tokenisation conventions shared by editing, statistics and evaluation.

One place decides how a prompt and a target become token ids, how batches are
padded (right padding, so positions are the same as for a lone sequence) and
which token is the subject's last, so the editor and the metrics always agree.
"""

from __future__ import annotations

from typing import Sequence

import torch


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token one (its EOS), as batching needs it."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Ids of a prompt as the model sees it at the start of a sequence (BOS if the tokenizer adds one).

    A prompt is continued, never ended: an EOS that the tokenizer appends is dropped (otherwise
    it would become the "last token" that keys, values and gates are read at).
    """
    ids = list(tokenizer(text)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and len(ids) > 1 and ids[-1] == eos:
        plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not plain or plain[-1] != eos:  # appended by the tokenizer, not written in the text
            ids = ids[:-1]
    return ids


def encode_target(tokenizer, target: str) -> list[int]:
    """Ids of a target continuation (no special tokens); raises on an empty result."""
    ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (input_ids, attention_mask)."""
    if not sequences:
        raise ValueError("empty batch")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def subject_last_index(tokenizer, template: str, subject: str) -> int:
    """Position of the subject's last token in ``template.format(subject)`` (MEMIT's 'subject_last')."""
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must hold '{{}}' exactly once")
    # The template escapes literal braces as {{ }}; the prefix is plain text.
    prefix = template[: template.index("{}")].replace("{{", "{").replace("}}", "}")
    return len(encode_prompt(tokenizer, prefix + subject)) - 1
