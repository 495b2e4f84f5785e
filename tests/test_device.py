"""comeba on a CUDA device: the statistics, edits, saved states and evaluation a CPU gives.

Skipped where torch sees no CUDA device (CI has none). On a GPU machine:
`python -m pytest -q -m cuda`. The same tiny random models as everywhere else,
built on the CPU and copied to the GPU, so both devices start from the same weights.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from comeba.cli import main
from comeba.compute import context_templates
from comeba.editor import Editor
from comeba.evaluate import Settings, evaluate
from comeba.hparams import HParams
from comeba.methods import METHODS
from comeba.models import detect_layout, fingerprint, resolve_device, weights_checksum
from comeba.scoring import CORE
from comeba.stats import compute_second_moments
from comeba.corpus import text_corpus
from test_editor import HP as EDITOR_HP
from test_editor import R1, R2, R3, _p_first
from test_evaluate import HP as EVAL_HP
from test_evaluate import REQUESTS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("shared_comeba_home"),
]

EDIT_ARCHS = ("gpt2", "llama", "gpt_neox")
CUDA = torch.device("cuda")


@pytest.fixture
def corpus(corpus_file):
    return text_corpus([corpus_file])


def _pair(make_tiny, arch: str, dtype: torch.dtype = torch.float32):
    cpu = make_tiny(arch)
    return cpu, copy.deepcopy(cpu).to(CUDA, dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def test_auto_device_is_cuda_and_fingerprints_do_not_depend_on_the_device(make_tiny):
    assert resolve_device("auto").type == "cuda"
    cpu, gpu = _pair(make_tiny, "llama")
    assert fingerprint(gpu) == fingerprint(cpu)  # statistics caches and states move between devices
    assert weights_checksum(gpu) == weights_checksum(cpu)


@pytest.mark.parametrize("arch", EDIT_ARCHS)
def test_statistics_match_the_cpu(make_tiny, tokenizer, corpus, arch):
    cpu, gpu = _pair(make_tiny, arch)
    layout = detect_layout(cpu)
    c_cpu, n_cpu = compute_second_moments(cpu, tokenizer, layout, [1, 2], corpus, 2000, progress=False)
    c_gpu, n_gpu = compute_second_moments(gpu, tokenizer, layout, [1, 2], corpus, 2000, progress=False)
    assert n_gpu == n_cpu
    for l in (1, 2):
        assert c_gpu[l].device.type == "cuda" and c_gpu[l].dtype == torch.float64
        assert _rel(c_gpu[l], c_cpu[l]) < 1e-4


def test_context_templates_are_seeded_and_leave_the_cuda_random_state(make_tiny, tokenizer):
    _, gpu = _pair(make_tiny, "llama")
    hp = HParams(**EDITOR_HP)
    torch.cuda.manual_seed(123)
    state = torch.cuda.get_rng_state()
    first = context_templates(gpu, tokenizer, hp)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert context_templates(gpu, tokenizer, hp) == first and len(first) == 2


@pytest.mark.parametrize("arch", EDIT_ARCHS)
def test_edits_match_the_cpu_and_the_state_moves_between_devices(make_tiny, tokenizer, corpus, arch, tmp_path):
    """Given the same context templates (sampled per device), both devices write the same edit."""
    cpu, gpu = _pair(make_tiny, arch)
    hp = HParams(**EDITOR_HP)
    e_cpu = Editor(cpu, tokenizer, hp, corpus=corpus, progress=False)
    c0 = {l: s.c_accu / hp.mom2_update_weight for l, s in e_cpu.layers.items()}
    e_gpu = Editor.from_statistics(gpu, tokenizer, hp, c0, templates=e_cpu.templates, progress=False)
    for ed, model in ((e_cpu, cpu), (e_gpu, gpu)):
        before = weights_checksum(model)
        ed.edit([R1, R2, R3])
        assert weights_checksum(model) == before
    for l in hp.layers:
        s_gpu, s_cpu = e_gpu.layers[l], e_cpu.layers[l]
        assert s_gpu.delta.device.type == "cuda" and s_gpu.c_accu.device.type == "cuda"
        assert _rel(s_gpu.delta, s_cpu.delta) < 2e-2, l
        assert _rel(s_gpu.c_accu, s_cpu.c_accu) < 1e-4, l
        assert s_gpu.alpha == pytest.approx(s_cpu.alpha, abs=0.05)
    with e_gpu.applied(), e_cpu.applied():
        for r in (R1, R2, R3):
            assert _p_first(gpu, tokenizer, r) == pytest.approx(_p_first(cpu, tokenizer, r), abs=0.02)
    unedited = _p_first(gpu, tokenizer, R1)
    with e_gpu.applied():  # the edit took on the GPU (tiny random models move probabilities a little)
        assert _p_first(gpu, tokenizer, R1) > 1.2 * unedited

    # saved on the GPU, resumed on the CPU (and back): the same tensors, the same answers
    e_gpu.save_pretrained(tmp_path / "state")
    back = Editor.from_pretrained(cpu, tokenizer, tmp_path / "state", progress=False)
    for l in hp.layers:
        assert back.layers[l].delta.device.type == "cpu"
        assert torch.equal(back.layers[l].delta, e_gpu.layers[l].delta.cpu())
        assert torch.equal(back.layers[l].c_accu, e_gpu.layers[l].c_accu.cpu())
    again = Editor.from_pretrained(gpu, tokenizer, tmp_path / "state", progress=False)
    with again.applied():
        p_again = _p_first(gpu, tokenizer, R1)
    with e_gpu.applied():
        assert p_again == _p_first(gpu, tokenizer, R1)
    assert again.generate([R1["prompt"]], max_new_tokens=3) == e_gpu.generate([R1["prompt"]], max_new_tokens=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_edit_on_the_gpu(make_tiny, tokenizer, corpus, dtype):
    """A large model is loaded in half precision: the float32/float64 editor state works beside it."""
    _, gpu = _pair(make_tiny, "llama", dtype)
    before = weights_checksum(gpu)
    ed = Editor(gpu, tokenizer, HParams(**EDITOR_HP), corpus=corpus, progress=False)
    unedited = [_p_first(gpu, tokenizer, r) for r in (R1, R2, R3)]
    ed.edit([R1, R2, R3])
    ed.edit([{"prompt": "The first album of the band", "subject": "the band", "target_new": "Paris"}])
    assert weights_checksum(gpu) == before
    for l, s in ed.layers.items():
        assert s.delta.dtype == torch.float32 and s.c_accu.dtype == torch.float64
        assert torch.isfinite(s.delta).all() and s.delta.abs().sum() > 0
    with ed.applied():
        edited = [_p_first(gpu, tokenizer, r) for r in (R1, R2, R3)]
        logits = gpu(input_ids=torch.tensor([tokenizer(R1["prompt"]).input_ids], device=CUDA)).logits
        assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert edited[0] > 1.2 * unedited[0] and edited[1] > 1.2 * unedited[1], (unedited, edited)
    assert len(ed.generate([R2["prompt"]], max_new_tokens=3)) == 1


@pytest.mark.parametrize("method", METHODS)
def test_evaluation_on_the_gpu(make_tiny, tokenizer, corpus, method):
    cpu, gpu = _pair(make_tiny, "llama")
    settings = Settings(counterfact=True, generation=True, fluency_tokens=5)
    runs = {}
    for name, model in (("cpu", cpu), ("cuda", gpu)):
        before = weights_checksum(model)
        runs[name] = evaluate(model, tokenizer, REQUESTS, method=method, protocol="consecutive", hparams=EVAL_HP,
                              corpus=corpus, batch_size=2, checkpoint_every=1, settings=settings, progress=False)
        assert weights_checksum(model) == before
        assert not [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    s_cpu, s_gpu = runs["cpu"], runs["cuda"]
    assert s_gpu["device"].startswith("cuda") and s_gpu["peak_gpu_mb"] > 0
    for k in CORE:  # before editing both devices see the same argmax tokens
        assert s_gpu["pre"][k] == pytest.approx(s_cpu["pre"][k], abs=1e-6), k
    # after editing they differ: each device samples its own context templates
    assert s_gpu["post"]["reliability"] > s_gpu["pre"]["reliability"]


def test_cli_runs_on_the_gpu(tmp_path, tokenizer, make_tiny, monkeypatch, capsys):
    from test_cli import EDITS, HPARAMS_YAML, STATS_TEXT

    folder = tmp_path / "model"
    make_tiny("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setenv("COMEBA_HOME", str(tmp_path / "home"))
    (tmp_path / "edits.json").write_text(json.dumps(EDITS))
    (tmp_path / "hp.yaml").write_text(HPARAMS_YAML)
    (tmp_path / "stats.txt").write_text(STATS_TEXT * 4)
    common = ["--model", str(folder), "--stats-text", str(tmp_path / "stats.txt"), "--hparams", str(tmp_path / "hp.yaml")]
    assert main(["edit", "--edits", str(tmp_path / "edits.json"), "--state", str(tmp_path / "state"), *common,
                 "--max-new-tokens", "3", "--device", "cuda"]) == 0
    assert "(cuda:0, float32)" in capsys.readouterr().err
    # the state written on the GPU generates on the CPU
    assert main(["generate", "--state", str(tmp_path / "state"), "--device", "cpu", "--max-new-tokens", "2", "--quiet",
                 "The Eiffel Tower is in the city of"]) == 0
    assert main(["generate", "--state", str(tmp_path / "state"), "--device", "cuda:7", "--quiet", "x"]) == 2
    assert "only 1 CUDA device" in capsys.readouterr().err or torch.cuda.device_count() > 7
