"""Where key statistics and the gate's calibration text come from: local text, a Hugging Face dataset, or
text sampled from the model itself, cut into token batches (also per rank, for several processes)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .models import input_device
from .text import encode_prompt

log = logging.getLogger(__name__)

MAX_SEQ_LEN = 256
MIN_PARAGRAPH_CHARS = 20
SAMPLE_SEEDS = ("The", "In", "A", "It", "When", "He", "She", "This", "There", "After", "According to", "Many")


@dataclass(frozen=True)
class Corpus:
    """Where key statistics come from: local text, a HF dataset, or the model's own samples.

    `ident` names it uniquely for the cache (it changes when the text does);
    `describe` is what the user is told.
    """

    kind: str  # "text" | "hf" | "samples"
    paths: tuple[str, ...] = ()
    dataset: str = ""
    ident: str = ""
    describe: str = ""


def text_corpus(paths: Sequence[str | os.PathLike]) -> Corpus:
    """Local .txt files or folders of them; identity is a hash of their bytes."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*.txt") if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"statistics text {str(p)!r} does not exist")
    if not files:
        raise FileNotFoundError(f"no .txt files found in {', '.join(map(str, paths))}")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    names = "+".join(f.stem for f in files)[:40]
    return Corpus(
        kind="text",
        paths=tuple(str(f.resolve()) for f in files),
        ident=f"text-{_safe(names)}-{h.hexdigest()[:12]}",
        describe=f"local text: {', '.join(str(f) for f in files)}",
    )


def hf_corpus(spec: str = "wikitext:wikitext-103-raw-v1:train") -> Corpus:
    """A Hugging Face dataset given as NAME[:CONFIG[:SPLIT]] (needs `datasets` and network)."""
    return Corpus(kind="hf", dataset=spec, ident=f"hf-{_safe(spec)}", describe=f"Hugging Face dataset {spec}")


def samples_corpus(seed: int = 0) -> Corpus:
    """Text sampled from the model itself: needs nothing, works offline."""
    return Corpus(
        kind="samples",
        ident=f"samples-seed{seed}",
        describe=f"text sampled from the model itself (offline fallback, seed {seed})",
        dataset=str(seed),
    )


def default_corpus(timeout: float = 3.0) -> Corpus:
    """wikitext-103 when `datasets` is installed and the hub is reachable, else the model's samples."""
    try:
        import datasets  # noqa: F401

        if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
            raise OSError("offline mode")
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return hf_corpus()
    except (ImportError, OSError):
        return samples_corpus()


def corpus_from_spec(spec: str, seed: int = 0) -> Corpus:
    """`auto`, `samples`, a local file or folder of .txt, or a HF dataset NAME[:CONFIG[:SPLIT]]."""
    if spec == "auto":
        return default_corpus()
    if spec == "samples":
        return samples_corpus(seed)
    if Path(spec).exists():
        return text_corpus([spec])
    return hf_corpus(spec)


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


# --------------------------------------------------------------------------- text streams


def paragraphs_from_files(paths: Sequence[str]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if len(line) >= MIN_PARAGRAPH_CHARS and not line.startswith("="):
                    yield line


def _paragraphs_from_hf(spec: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("a Hugging Face statistics corpus needs `pip install datasets`") from err
    name, config, split = (spec.split(":") + [None, None])[:3]
    ds = datasets.load_dataset(name, config, split=split or "train", streaming=True)
    for row in ds:
        text = (row.get("text") or "").strip()
        if len(text) >= MIN_PARAGRAPH_CHARS:
            yield text


def _sampled_batches(model, tokenizer, seed: int, batch: int, length: int, start: int = 0,
                     step: int = 1) -> Iterator[list[list[int]]]:
    """Endless batches of model samples (top-k 50), seeded for reproducibility.

    Batch i depends on i alone: `start`/`step` give the batches start, start + step, ...
    """
    device = input_device(model)
    round_ = start
    while True:
        starts = [SAMPLE_SEEDS[(round_ * batch + i) % len(SAMPLE_SEEDS)] for i in range(batch)]
        seqs = [encode_prompt(tokenizer, s) for s in starts]
        # Equal-length seeds per batch keep the sampler simple (no left padding needed).
        width = min(len(s) for s in seqs)
        ids = torch.tensor([s[:width] for s in seqs], device=device)
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(seed * 100_003 + round_)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=50,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=tokenizer.pad_token_id,
            )
        yield [row.tolist() for row in out]
        round_ += step


def token_batches(corpus: Corpus, model, tokenizer, batch_size: int, rank: int = 0,
                   world: int = 1) -> Iterator[list[list[int]]]:
    """The corpus as batches of token-id lists; with `world` > 1 only the batches i with i % world == rank
    (the others are skipped without tokenizing or sampling them), in order."""
    if corpus.kind == "samples":
        yield from _sampled_batches(model, tokenizer, int(corpus.dataset or 0), batch_size, MAX_SEQ_LEN // 2,
                                    start=rank, step=world)
        return
    paragraphs = paragraphs_from_files(corpus.paths) if corpus.kind == "text" else _paragraphs_from_hf(corpus.dataset)
    batch: list[list[int]] = []
    for i, text in enumerate(paragraphs):
        if (i // batch_size) % world == rank:
            batch.append(encode_prompt(tokenizer, text)[:MAX_SEQ_LEN])
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def calibration_sample(
    model, tokenizer, corpus: Corpus, n_tokens: int, skip_tokens: int, seq_len: int = 128, batch_size: int = 16
) -> list[list[int]]:
    """Held-back general text for calibrating the gate: `n_tokens` tokens in sequences of ≤ `seq_len`.

    Taken from the corpus after the batches that the statistics of
    `skip_tokens` tokens consumed (the same batching as
    `compute_second_moments`), so the gate is calibrated on text its C0 has
    not seen. The model's own samples are drawn with another seed. A corpus
    too short for both starts again from its beginning (with a warning).
    """
    if corpus.kind == "samples":
        corpus = samples_corpus(int(corpus.dataset or 0) + 7919)
        skip_tokens = 0
    out: list[list[int]] = []
    total = 0
    for attempt in range(2):
        seen = 0
        for seqs in token_batches(corpus, model, tokenizer, batch_size):
            if seen < skip_tokens:
                seen += sum(len(s) for s in seqs)
                continue
            for seq in seqs:
                piece = seq[:seq_len]
                if len(piece) < 2:
                    continue
                out.append(piece[: n_tokens - total])
                total += len(out[-1])
                if total >= n_tokens:
                    return out
        if attempt == 0 and skip_tokens:
            log.warning("statistics corpus (%s) holds too little text beyond its first %d tokens to hold back "
                        "%d for the gate's calibration; reusing its beginning", corpus.describe, skip_tokens, n_tokens)
            skip_tokens = 0
        else:
            break
    if not out:
        raise ValueError(f"corpus ({corpus.describe}) yielded no text to calibrate the gate on")
    log.warning("gate calibration: only %d of %d tokens of general text available", total, n_tokens)
    return out


