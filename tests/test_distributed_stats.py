"""comeba.stats on several processes: torchrun, gloo, two ranks on the CPU.

The ranks share the batches of the single-process stream and all-reduce the
sums, so the statistics are the single process's to float tolerance, over
exactly the same tokens; rank 0 alone writes the cache, whose key does not
depend on the number of processes.

Run as a script (under torchrun) this file is the worker of the library-level test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

N_LINES = 135  # 8 full batches of 16 paragraphs and one of 7: rank 0 gets five batches, rank 1 four
LAYERS = [1, 2]


# --------------------------------------------------------------------------- worker (run by torchrun)


class _Unseen(type(Path())):
    """A path whose file is not on this process's file system."""

    def is_file(self) -> bool:
        return False



def _worker(model_dir: str, corpus_path: str, out_dir: str, budgets: str) -> None:
    torch.set_num_threads(1)
    import comeba.stats as stats
    from comeba.corpus import text_corpus
    from comeba.distributed import init_distributed_from_env, leave_group
    from comeba.models import detect_layout, load_model

    assert init_distributed_from_env("cpu"), "WORLD_SIZE > 1 should have made this process join a group"
    rank = torch.distributed.get_rank()
    writes: list[str] = []
    save_tensors, write_text = stats.atomic_save_tensors, stats.atomic_write_text

    def record(real):
        def wrapped(path, payload):
            writes.append(Path(path).name)
            return real(path, payload)
        return wrapped

    stats.atomic_save_tensors, stats.atomic_write_text = record(save_tensors), record(write_text)
    finished = False
    try:
        model, tokenizer = load_model(model_dir)
        layout = detect_layout(model)
        corpus = text_corpus([corpus_path])
        results, provenances = {}, {}
        for budget in map(int, budgets.split(",")):
            mats, prov = stats.load_or_compute_stats(model, tokenizer, layout, LAYERS, corpus, budget, "float64",
                                                     progress=False)
            # served from rank 0's cache; rank 1 plays a node that cannot see rank 0's files
            if rank == 1:
                stats.Path = _Unseen
            try:
                again, prov_again = stats.load_or_compute_stats(model, tokenizer, layout, LAYERS, corpus, budget,
                                                                "float64", progress=False)
            finally:
                stats.Path = Path
            assert all(torch.equal(again[l], mats[l]) for l in LAYERS)
            assert all(prov_again["layers"][str(l)]["cached"] for l in LAYERS)
            results[budget] = {l: m.cpu() for l, m in mats.items()}
            provenances[budget] = prov
        finished = True
    finally:
        leave_group(finished)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"writes": writes, "provenance": provenances}))


# --------------------------------------------------------------------------- helpers


GLOO_EXIT_ABORT = "terminate called without an active exception"


def _env(home: Path) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COMEBA_HOME": str(home),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}


def _torchrun(args: list[str], home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Two processes on this machine; --standalone picks a free port for their rendezvous."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           *args]
    done = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 and GLOO_EXIT_ABORT in done.stdout + done.stderr:
        # a known, rare abort of gloo's threads as a rank exits after its work (once in six runs on a
        # 2-core machine, leave_group's barrier notwithstanding): run once more; any other failure fails at once
        done = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _corpus(tmp_path, corpus_file) -> Path:
    """A corpus of N_LINES paragraphs."""
    lines = corpus_file.read_text(encoding="utf-8").splitlines()[:N_LINES]
    assert len(lines) == N_LINES
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return corpus


def _setup(tmp_path, make_tiny, tokenizer, corpus_file) -> tuple[Path, Path]:
    """A tiny llama saved as a model folder, and the corpus."""
    model_dir = tmp_path / "model"
    make_tiny("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, _corpus(tmp_path, corpus_file)


def _batch_tokens(corpus, tokenizer) -> list[int]:
    from comeba.corpus import token_batches

    return [sum(map(len, seqs)) for seqs in token_batches(corpus, None, tokenizer, 16)]


# --------------------------------------------------------------------------- tests


def test_sharded_batches_are_the_single_process_stream(tmp_path, make_tiny, tokenizer, corpus_file, one_thread):
    """Rank r of N takes the batches r, r + N, ... of the single-process stream, untouched."""
    from itertools import islice

    from comeba.corpus import samples_corpus, text_corpus, token_batches

    corpus = text_corpus([_corpus(tmp_path, corpus_file)])
    whole = list(token_batches(corpus, None, tokenizer, 16))
    assert len(whole) == 9
    for world in (2, 3, 4):
        shards = [list(token_batches(corpus, None, tokenizer, 16, rank, world)) for rank in range(world)]
        for rank, shard in enumerate(shards):
            assert shard == whole[rank::world]
    # the model's own samples: each rank samples only its batches, seeded by their index
    model, samples = make_tiny("llama"), samples_corpus(seed=1)
    whole = list(islice(token_batches(samples, model, tokenizer, 2), 4))
    for rank in range(2):
        assert list(islice(token_batches(samples, model, tokenizer, 2, rank, 2), 2)) == whole[rank::2]


def test_two_processes_equal_one(tmp_path, make_tiny, tokenizer, corpus_file, one_thread):
    """Library level: the same tokens, the same matrices (rtol 1e-5), and only rank 0 writes the cache."""
    from comeba.models import detect_layout, load_model
    from comeba.stats import compute_second_moments
    from comeba.corpus import text_corpus

    model_dir, path = _setup(tmp_path, make_tiny, tokenizer, corpus_file)
    per_batch = _batch_tokens(text_corpus([path]), tokenizer)
    cum = torch.tensor(per_batch).cumsum(0).tolist()
    # whole corpus (the ranks run out unevenly); stop in rank 0's batch 4; stop in rank 1's batch 5
    budgets = [10**6, cum[3] + 1, cum[4] + 1]
    expected_counts = [cum[-1], cum[4], cum[5]]
    out = tmp_path / "out"
    out.mkdir()
    _torchrun([__file__, str(model_dir), str(path), str(out), ",".join(map(str, budgets))], tmp_path / "home")

    model, tok = load_model(str(model_dir))
    layout = detect_layout(model)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for budget, n in zip(budgets, expected_counts):
        single, count = compute_second_moments(model, tok, layout, LAYERS, text_corpus([path]), budget,
                                               progress=False)
        assert count == n
        for r in range(2):
            prov = infos[r]["provenance"][str(budget)]
            assert prov["world_size"] == 2
            for layer in LAYERS:
                meta = prov["layers"][str(layer)]
                assert meta["n_tokens"] == count and meta["world_size"] == 2 and meta["cached"] is False
                torch.testing.assert_close(ranks[r][budget][layer], single[layer], rtol=1e-5, atol=1e-9)
            assert prov == infos[0]["provenance"][str(budget)]  # every rank returns rank 0's provenance
        assert all(torch.equal(ranks[1][budget][l], ranks[0][budget][l]) for l in LAYERS)

    # rank 0 alone wrote the cache: a tensor and a JSON per layer and budget, each once
    assert infos[1]["writes"] == []
    assert sorted(infos[0]["writes"]) == sorted(f"layer{l}-{b}tok-float64.{ext}" for b in budgets for l in LAYERS
                                                 for ext in ("safetensors", "json"))
    assert len(list((tmp_path / "home").rglob("*.safetensors"))) == len(budgets) * len(LAYERS)
    assert not list((tmp_path / "home").rglob(".tmp-*"))


def test_torchrun_comeba_stats_shares_the_single_process_cache(tmp_path, make_tiny, tokenizer, corpus_file,
                                                                one_thread, monkeypatch, capsys):
    """`torchrun -m comeba stats` writes the cache a single process reads (same key, same numbers)."""
    from safetensors.torch import load_file

    from comeba.cli import main
    from comeba.models import detect_layout, load_model
    from comeba.stats import load_or_compute_stats
    from comeba.corpus import text_corpus

    model_dir, path = _setup(tmp_path, make_tiny, tokenizer, corpus_file)
    budget = 1500
    dist_home, single_home = tmp_path / "home-2", tmp_path / "home-1"
    args = ["stats", "--model", str(model_dir), "--layers", *map(str, LAYERS), "--stats-text", str(path),
            "--stats-tokens", str(budget), "--device", "cpu"]
    done = _torchrun(["-m", "comeba", *args], dist_home)
    assert done.stdout.count("2 processes (gloo)") == 1, done.stdout  # rank 0 speaks, rank 1 is silent
    assert done.stdout.count("computed now") == len(LAYERS), done.stdout

    monkeypatch.setenv("COMEBA_HOME", str(single_home))
    model, tok = load_model(str(model_dir))
    layout = detect_layout(model)
    single, prov = load_or_compute_stats(model, tok, layout, LAYERS, text_corpus([path]), budget, progress=False)
    files = sorted(p.relative_to(single_home) for p in single_home.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(dist_home) for p in dist_home.rglob("*.safetensors"))  # the same key
    for layer in LAYERS:
        rel = Path(prov["layers"][str(layer)]["file"]).relative_to(single_home)
        meta1 = json.loads((single_home / rel).with_suffix(".json").read_text())
        meta2 = json.loads((dist_home / rel).with_suffix(".json").read_text())
        assert (meta1["world_size"], meta2["world_size"]) == (1, 2)
        assert meta1["n_tokens"] == meta2["n_tokens"] and meta2["module"] == layout.mlp_out_name(layer)
        torch.testing.assert_close(load_file(str(dist_home / rel))["mom2"], load_file(str(single_home / rel))["mom2"],
                                   rtol=1e-5, atol=1e-7)

    # one process finds what two wrote
    monkeypatch.setenv("COMEBA_HOME", str(dist_home))
    capsys.readouterr()
    assert main([*args, "--quiet"]) == 0
    said = capsys.readouterr().out
    assert said.count("cached (created") == len(LAYERS) and "on 2 processes" in said, said


if __name__ == "__main__":
    _worker(*sys.argv[1:])
