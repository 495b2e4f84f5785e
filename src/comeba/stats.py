"""Second-moment statistics of MLP keys: C0 = E[k kᵀ] over general text.

This is the one expensive one-off step, so it streams the corpus, runs the
model only up to the last edited layer, accumulates in float64 over the
non-padding tokens, and caches the result on disk keyed by everything that
changes it (model fingerprint, layer, corpus, token budget, dtype) with a
JSON provenance file beside each tensor.

Under torchrun (an initialised torch.distributed process group of more than
one process) the work is shared: rank r runs the batches r, r + N, r + 2N...
of the single-process batch stream, the ranks agree batch by batch on where
the token budget ends, and the sums of k kᵀ and the token counts are
all-reduced, so the result holds exactly the single-process tokens (only the
order of summation differs). Rank 0 writes the cache; the other ranks wait
for it and read it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .corpus import Corpus, token_batches
from .distributed import all_reduce, broadcast_object, comm_device, dist_context
from .files import atomic_save_tensors, atomic_write_text
from .embedded import comeba_home
from .models import FINGERPRINT_PREFIX, Layout, fingerprint, input_device, legacy_fingerprint
from .text import pad_batch
from .trace import trace

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- computation


def _accumulate(model, tokenizer, layers: Sequence[int], names: Sequence[str], seqs, sums: dict[int, torch.Tensor]) -> int:
    """Add Σ k kᵀ of one batch's non-padding tokens to `sums` (float64); returns their number."""
    device = input_device(model)
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, device)
    with trace(model, names, inputs=True, stop_after=names[-1]) as rec:
        model(input_ids=ids, attention_mask=mask)
    valid = mask.reshape(-1).bool()
    for layer, name in zip(layers, names):
        x = rec[name].input  # on the layer's own device (a model spread over devices)
        k = x.reshape(-1, x.shape[-1])[valid.to(x.device)].to(torch.float64)
        if layer not in sums:
            sums[layer] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=k.device)
        sums[layer].addmm_(k.T, k)
    return int(valid.sum())


@torch.no_grad()
def compute_second_moments(
    model,
    tokenizer,
    layout: Layout,
    layers: Sequence[int],
    corpus: Corpus,
    n_tokens: int,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], int]:
    """E[k kᵀ] (float64) at each layer's MLP-output input, over up to `n_tokens` non-padding tokens.

    All layers come from one forward pass per batch that stops after the
    last of them. The model must carry no hooks that change its activations.
    The batches are taken until the one that reaches `n_tokens` (included).
    Inside a process group of several processes (see `dist_context`) every
    rank must call this with the same arguments: each runs its share of the
    same batches and every rank returns the all-reduced result.
    """
    layers = sorted(set(layers))
    names = [layout.mlp_out_name(l) for l in layers]
    ctx = dist_context()
    if ctx is not None:
        return _distributed_moments(model, tokenizer, layers, names, corpus, n_tokens, batch_size, progress, *ctx)
    sums: dict[int, torch.Tensor] = {}
    count = 0
    bar = tqdm(total=n_tokens, desc=f"key statistics ({corpus.kind})", unit="tok", disable=not progress)
    try:
        for seqs in token_batches(corpus, model, tokenizer, batch_size):
            added = _accumulate(model, tokenizer, layers, names, seqs, sums)
            count += added
            bar.update(min(added, max(0, n_tokens - bar.n)))
            if count >= n_tokens:
                break
    finally:
        bar.close()
    if count == 0:
        raise ValueError(f"statistics corpus ({corpus.describe}) yielded no tokens")
    if count < n_tokens:
        log.warning("statistics corpus ran out: %d of %d tokens", count, n_tokens)
    return {l: s / count for l, s in sums.items()}, count


def _distributed_moments(model, tokenizer, layers, names, corpus: Corpus, n_tokens: int, batch_size: int,
                         progress: bool, rank: int, world: int) -> tuple[dict[int, torch.Tensor], int]:
    """The ranks take the single-process batches in rounds: batch j·world + r is rank r's in round j.

    Each round the ranks all-reduce the token counts of their batches (-1:
    the corpus has ended), so every rank knows which of the round's batches
    the single process would still have taken (those that start below the
    budget) and runs its own only if so: the token set is the single
    process's exactly.
    """
    device = input_device(model)
    sums: dict[int, torch.Tensor] = {}
    count = 0
    bar = tqdm(total=n_tokens, desc=f"key statistics ({corpus.kind}, {world} processes)", unit="tok",
               disable=not progress or rank != 0)
    batches = token_batches(corpus, model, tokenizer, batch_size, rank, world)
    try:
        ended = False
        while count < n_tokens and not ended:
            seqs = next(batches, None)
            lens = torch.zeros(world, dtype=torch.int64, device=device)
            lens[rank] = -1 if seqs is None else sum(len(s) for s in seqs)
            lens = all_reduce(lens).tolist()
            take_mine, added = False, 0
            for r, n in enumerate(lens):
                if n < 0:
                    ended = True
                    break
                if count + added >= n_tokens:
                    break
                take_mine |= r == rank
                added += n
            if take_mine:
                got = _accumulate(model, tokenizer, layers, names, seqs, sums)
                assert got == lens[rank], (got, lens[rank])
            count += added
            bar.update(min(added, max(0, n_tokens - bar.n)))
    finally:
        bar.close()
        batches.close()
    if count == 0:
        raise ValueError(f"statistics corpus ({corpus.describe}) yielded no tokens")
    if count < n_tokens and rank == 0:
        log.warning("statistics corpus ran out: %d of %d tokens", count, n_tokens)
    # A rank that ran no batch still takes part, with zeros of the size the others found.
    dims = torch.tensor([sums[l].shape[0] if l in sums else 0 for l in layers], dtype=torch.int64, device=device)
    dims = all_reduce(dims, torch.distributed.ReduceOp.MAX).tolist()
    out = {}
    for layer, d in zip(layers, dims):
        total = sums.get(layer)
        if total is None:
            total = torch.zeros(d, d, dtype=torch.float64, device=device)
        out[layer] = all_reduce(total).div_(count)  # in place: no second d_in² float64 copy at the peak
    return out, count


def stats_dir(model_fp: str, corpus: Corpus) -> Path:
    return comeba_home() / "stats" / model_fp / corpus.ident


def _file_stem(layer: int, n_tokens: int, dtype: str) -> str:
    return f"layer{layer}-{n_tokens}tok-{dtype}"


def load_or_compute_stats(
    model,
    tokenizer,
    layout: Layout,
    layers: Sequence[int],
    corpus: Corpus,
    n_tokens: int,
    dtype: str = "float32",
    model_fp: str | None = None,
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], dict]:
    """C0 per layer (float64 in memory) from the disk cache, computing what is missing.

    Returns the matrices and a provenance dict (corpus, tokens, cache files).
    Inside a process group of several processes every rank calls this with
    the same arguments: the ranks compute together, rank 0 alone looks in
    and writes the cache, and every rank returns rank 0's result. The cache
    key does not depend on the number of processes; the provenance records it.
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"statistics dtype must be float32 or float64, not {dtype!r}")
    model_fp = model_fp or fingerprint(model)
    folder = stats_dir(model_fp, corpus)
    _adopt_legacy_cache(model, corpus, folder)
    ctx = dist_context()
    rank, world = ctx or (0, 1)
    provenance = {"corpus": corpus.describe, "corpus_id": corpus.ident, "n_tokens_requested": n_tokens,
                  "dtype": dtype, "model_fingerprint": model_fp, "world_size": world, "layers": {}}
    if ctx is None:
        out, missing = _from_cache(folder, layers, n_tokens, dtype, provenance)
        if missing:
            mats, count, seconds = _compute(model, tokenizer, layout, missing, corpus, n_tokens, progress)
            _write(layout, mats, count, seconds, corpus, n_tokens, dtype, model_fp, folder, out, provenance, world)
        return out, provenance
    return _distributed_load_or_compute(model, tokenizer, layout, layers, corpus, n_tokens, dtype, model_fp, folder,
                                        progress, provenance, rank, world)


def _adopt_legacy_cache(model, corpus: Corpus, folder: Path) -> None:
    """Move a cache made under the first fingerprint format to this model's folder (once; statistics take hours
    on a big model). Inside a process group rank 0 alone touches the disk."""
    if folder.exists() or (dist_context() or (0, 1))[0] != 0:
        return
    # The legacy fingerprint is a pass over every weight: computed only when an old-format cache of this
    # corpus exists at all ($COMEBA_HOME/stats/<fingerprint>/<corpus>).
    root = folder.parent.parent
    old = [d for d in (root.iterdir() if root.is_dir() else ())
           if not d.name.startswith(FINGERPRINT_PREFIX) and (d / corpus.ident).is_dir()]
    if not old:
        return
    legacy = stats_dir(legacy_fingerprint(model), corpus)
    if legacy.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            legacy.rename(folder)
        except OSError:  # another process adopted it first
            pass


def _from_cache(folder: Path, layers: Sequence[int], n_tokens: int, dtype: str,
                provenance: dict) -> tuple[dict[int, torch.Tensor], list[int]]:
    """The cached layers (filling provenance["layers"]) and the missing ones."""
    out: dict[int, torch.Tensor] = {}
    missing = []
    for layer in layers:
        stem = _file_stem(layer, n_tokens, dtype)
        tensor_file, meta_file = folder / f"{stem}.safetensors", folder / f"{stem}.json"
        if tensor_file.is_file() and meta_file.is_file():
            out[layer] = load_file(str(tensor_file))["mom2"].to(torch.float64)
            provenance["layers"][str(layer)] = {**json.loads(meta_file.read_text()), "file": str(tensor_file), "cached": True}
        else:
            missing.append(layer)
    return out, missing


def _compute(model, tokenizer, layout: Layout, missing: Sequence[int], corpus: Corpus, n_tokens: int,
             progress: bool, announce: bool = True) -> tuple[dict[int, torch.Tensor], int, float]:
    """(matrices, tokens, seconds) of the missing layers (collectively inside a process group)."""
    start = time.perf_counter()
    if announce:
        log.info("computing key statistics for layers %s from %s", list(missing), corpus.describe)
    mats, count = compute_second_moments(model, tokenizer, layout, missing, corpus, n_tokens, progress=progress)
    return mats, count, time.perf_counter() - start


def _write(layout: Layout, mats: dict[int, torch.Tensor], count: int, seconds: float, corpus: Corpus, n_tokens: int,
           dtype: str, model_fp: str, folder: Path, out: dict, provenance: dict, world: int) -> None:
    """Cache each matrix (atomically) with its provenance JSON; fills `out` and provenance["layers"]."""
    folder.mkdir(parents=True, exist_ok=True)
    for layer, mat in mats.items():
        stem = _file_stem(layer, n_tokens, dtype)
        meta = {"layer": layer, "module": layout.mlp_out_name(layer), "corpus": corpus.describe,
                "corpus_id": corpus.ident, "n_tokens": count, "n_tokens_requested": n_tokens,
                "dtype": dtype, "model_fingerprint": model_fp, "world_size": world, "seconds": round(seconds, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_save_tensors(folder / f"{stem}.safetensors", {"mom2": mat.to(getattr(torch, dtype)).cpu().contiguous()})
        atomic_write_text(folder / f"{stem}.json", json.dumps(meta, indent=2))
        out[layer] = mat.to(getattr(torch, dtype)).to(torch.float64)
        provenance["layers"][str(layer)] = {**meta, "file": str(folder / f"{stem}.safetensors"), "cached": False}


def _distributed_load_or_compute(model, tokenizer, layout: Layout, layers: Sequence[int], corpus: Corpus,
                                 n_tokens: int, dtype: str, model_fp: str, folder: Path, progress: bool,
                                 provenance: dict, rank: int, world: int) -> tuple[dict[int, torch.Tensor], dict]:
    """Rank 0 looks in the cache and says what is missing; all ranks compute it; rank 0 writes the cache
    and then publishes its provenance, which the other ranks wait for before reading the cache."""
    out: dict[int, torch.Tensor] = {}
    failure: BaseException | None = None
    # 1. What is missing: rank 0's view of the cache decides for everyone.
    said = None
    if rank == 0:
        try:
            out, missing = _from_cache(folder, layers, n_tokens, dtype, provenance)
            said = ("ok", missing)
        except Exception as err:  # noqa: BLE001 - told to the other ranks, then raised here
            failure, said = err, ("error", f"{type(err).__name__}: {err}")
    status, missing = broadcast_object(said, rank)
    if status == "error":
        if failure is not None:
            raise failure
        raise RuntimeError(f"rank 0 could not read the statistics cache: {missing}")
    # 2. All ranks compute the missing layers together; rank 0 writes them (atomically, as alone).
    mats: dict[int, torch.Tensor] = {}
    if missing:
        mats, count, seconds = _compute(model, tokenizer, layout, missing, corpus, n_tokens, progress and rank == 0,
                                        announce=rank == 0)
        if rank == 0:
            try:
                _write(layout, mats, count, seconds, corpus, n_tokens, dtype, model_fp, folder, out, provenance, world)
            except Exception as err:  # noqa: BLE001 - told to the other ranks, then raised here
                failure = err
    # 3. The barrier: the other ranks wait for rank 0's provenance (or its error), then read the cache.
    said = (("error", f"{type(failure).__name__}: {failure}") if failure is not None else ("ok", provenance)) \
        if rank == 0 else None
    status, published = broadcast_object(said, rank)
    if status == "error":
        if failure is not None:
            raise failure
        raise RuntimeError(f"rank 0 could not write the statistics cache: {published}")
    lacking = []
    if rank != 0:
        provenance = published
        for layer in layers:
            tensor_file = Path(provenance["layers"][str(layer)]["file"])
            if tensor_file.is_file():  # the cache is on a file system this process shares with rank 0
                out[layer] = load_file(str(tensor_file))["mom2"].to(torch.float64)
            elif layer in mats:  # computed here too: the same sums, rounded as rank 0 stored them
                out[layer] = mats[layer].to(getattr(torch, dtype)).to(torch.float64)
            else:
                lacking.append(layer)
    # 4. Ranks that can see neither (another node, cached there only) get the matrices from rank 0.
    device = input_device(model)
    flag = all_reduce(torch.tensor([len(lacking)], dtype=torch.int64, device=device),
                       torch.distributed.ReduceOp.MAX)
    if int(flag.item()):
        for layer in layers:
            d = torch.tensor([out[layer].shape[0] if rank == 0 else 0], dtype=torch.int64, device=device)
            d = int(all_reduce(d, torch.distributed.ReduceOp.MAX).item())
            mat = out[layer].to(device) if rank == 0 else torch.zeros(d, d, dtype=torch.float64, device=device)
            where = comm_device(mat.device)
            mat = mat.to(where)
            torch.distributed.broadcast(mat, src=0)
            if layer in lacking:
                out[layer] = mat.cpu()
    return {l: out[l] for l in layers}, provenance
