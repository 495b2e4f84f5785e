"""comeba.plan: the memory plan's state figures against a saved state, its check, and `comeba plan`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from comeba.adapter import ADAPTER_WEIGHTS, EDITING_STATE
from comeba.cli import main
from comeba.corpus import text_corpus
from comeba.editor import Editor
from comeba.hparams import HParams
from comeba.plan import ModelShape, PlanError, human, memory_plan

pytestmark = pytest.mark.usefixtures("one_thread", "shared_comeba_home")

HP = dict(layers=[1, 2], v_num_grad_steps=3, mom2_update_weight=100.0, mom2_n_tokens=2000,
          context_template_prefixes=["The"], context_template_length=6)
REQUEST = {"prompt": "The mother tongue of Danielle Darrieux", "subject": "Danielle Darrieux", "target_new": "English"}


def _tensor_bytes(path: Path) -> dict[str, int]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}


@pytest.mark.parametrize("arch,gate", [("llama", "span"), ("gpt2", "reference")])
def test_state_bytes_equal_the_saved_tensors(make_tiny, tokenizer, corpus_file, tmp_path, arch, gate):
    model = make_tiny(arch)
    hp = HParams(**HP, gate=gate)
    editor = Editor(model, tokenizer, hp, corpus=text_corpus([corpus_file]), progress=False)
    editor.edit([REQUEST])
    editor.save_pretrained(tmp_path / "state")
    inference = _tensor_bytes(tmp_path / "state" / ADAPTER_WEIGHTS)
    editing = {k: v for k, v in _tensor_bytes(tmp_path / "state" / EDITING_STATE).items()
               if not k.startswith("calibration.")}

    from_model = memory_plan(model, hp, batch_size=1)
    from_config = memory_plan(model.config, hp, batch_size=1, dtype="float32")  # built on the meta device
    for plan in (from_model, from_config):
        assert plan.state_inference == sum(inference.values())
        assert plan.state_editing == sum(editing.values())
        for layer in plan.layers:
            module = editor.layout.mlp_out_name(layer.layer)
            assert layer.delta == inference[f"{module}.delta"]
            assert layer.c_accu == editing[f"{module}.c_accu"]
            assert layer.gate == inference.get(f"{module}.gate.whiten", 0) + inference.get(f"{module}.gate.span", 0)
            assert layer.c0 == editing.get(f"{module}.c0", 0)
    assert from_config.weights == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert from_config.shape.mlp_out == from_model.shape.mlp_out


def test_plan_counts_a_7b_llama_from_its_config_alone():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    plan = memory_plan(config, HParams(), 100, "bfloat16")
    assert plan.shape.n_params == 8_030_261_248 and plan.weights // 2**20 == 15316
    layer = plan.layers[0]
    assert (layer.delta, layer.c_accu, layer.c0, layer.gate) == (
        4096 * 14336 * 4, 14336**2 * 8, 14336**2 * 4, 2 * 14336**2 * 4)
    assert plan.state == 5 * layer.total
    assert plan.peak == plan.phases["batch"].peak > plan.phases["start"].peak > plan.phases["statistics"].peak
    assert any("C_accu stays float64" in note for note in plan.notes)


def _small_plan(make_tiny) -> object:
    return memory_plan(make_tiny("llama"), HParams(**HP), batch_size=4)


def test_check_names_what_does_not_fit(make_tiny):
    plan = _small_plan(make_tiny)
    plan.check(plan.peak)  # exactly enough
    with pytest.raises(PlanError, match=r"^the model weights need .* and the device has .*--device-map auto"):
        plan.check(plan.weights - 1)
    with pytest.raises(PlanError) as err:
        plan.check(plan.weights + plan.state - 1, where="cuda:0")
    message = str(err.value)
    assert message.startswith(f"the editor state needs {human(plan.state)} ({human(plan.layers[0].total)} per layer × 2")
    assert "cuda:0 has" in message and "use fewer layers, mom2_dtype float32, or --device-map auto" in message
    worst = plan.worst()
    with pytest.raises(PlanError, match=rf"^{worst.what} needs {human(worst.peak)} at its peak"):
        plan.check(plan.peak - 1)
    plan.check(plan.phases["batch"].peak, phases=["batch"])  # a resumed state: only the batch's peak
    assert plan.summary().startswith(f"memory plan: weights {human(plan.weights)} (float32) + editor state")


def test_plan_command_prints_the_table_from_a_saved_config(make_tiny, tmp_path, capsys):
    model = make_tiny("llama")
    model.config.save_pretrained(tmp_path)
    args = ["plan", "--config", str(tmp_path / "config.json"), "--layers", "1", "2", "--batch-size", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    from transformers import AutoConfig

    plan = memory_plan(AutoConfig.from_pretrained(tmp_path), HParams(layers=[1, 2]), 4)
    assert "| part | size | of which |" in out
    assert f"| model weights | {human(plan.weights)} |" in out
    assert f"| editor state, 2 layers | {human(plan.state)} | inference {human(plan.state_inference)}" in out
    assert f"| total: the largest peak | {human(plan.peak)} |" in out
    assert "C_accu stays float64" in out
    assert main([*args, "--memory", "1e-6"]) == 1
    assert "| device | 1.0 KiB | does not fit: the model weights need" in capsys.readouterr().out
    assert main([*args, "--memory", "80"]) == 0 and "| device | 80.0 GiB | fits |" in capsys.readouterr().out


def test_plan_command_refuses_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    assert main(["plan", "--config", str(bad)]) == 2
    assert "names no model_type" in capsys.readouterr().err
    assert main(["plan", "--config", str(tmp_path / "missing.json")]) == 2
    assert "cannot read the config file" in capsys.readouterr().err


@pytest.fixture
def edit_files(make_tiny, tokenizer, tmp_path, corpus_file) -> list[str]:
    model_dir = tmp_path / "model"
    make_tiny("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "hp.yaml").write_text("layers: [1, 2]\nv_num_grad_steps: 3\nmom2_n_tokens: 500\n"
                                      "context_template_prefixes: [The]\n")
    (tmp_path / "edits.json").write_text(json.dumps([REQUEST]))
    return ["edit", "--edits", str(tmp_path / "edits.json"), "--model", str(model_dir), "--hparams",
            str(tmp_path / "hp.yaml"), "--stats-text", str(corpus_file), "--max-new-tokens", "2", "--quiet",
            "--device", "cpu"]


def test_edit_refuses_when_the_cuda_device_is_too_small(edit_files, monkeypatch, capsys):
    import comeba.models

    monkeypatch.setattr(comeba.models, "resolve_device", lambda spec: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 80 * 2**30))
    assert main(edit_files) == 2
    captured = capsys.readouterr()
    assert "memory plan: weights" in captured.out and "cuda:0 has 1.0 KiB free" in captured.out
    assert captured.err.startswith("comeba: error: the model weights need ") and "--no-memory-check" in captured.err


def test_edit_prints_the_plan_and_warns_when_ram_is_short(edit_files, monkeypatch, capsys):
    import comeba.plan

    monkeypatch.setattr(comeba.plan, "available_ram", lambda: 2**20)
    assert main(edit_files) == 0
    captured = capsys.readouterr()
    assert "memory plan: weights" in captured.out and "1.0 MiB of memory available" in captured.out
    assert "comeba: warning: the plan's peak" in captured.err


def test_model_shape_of_a_real_and_a_meta_model_agree(make_tiny):
    model = make_tiny("gpt_neox")
    assert ModelShape.from_model(model).mlp_out == ModelShape.from_config(model.config, "float32").mlp_out


def test_bfloat16_target_values_count_the_copies_of_the_later_projections(make_tiny):
    """v_dtype bfloat16 holds a bfloat16 copy of every projection after l_n while the values are optimised."""
    from comeba.models import detect_layout, num_layers
    from comeba.plan import _values_stage

    model = make_tiny("llama")
    hp, shape = HParams(**HP), ModelShape.from_model(model)
    part = "bfloat16 copies of the later layers' projections"
    assert part not in _values_stage(shape, hp.replace(v_dtype="float32"), 4, 4, suffix=6, prefix=12, target=3)
    layout = detect_layout(model)
    later = [model.get_submodule(layout.layer_name(l)) for l in range(hp.layers[-1] + 1, num_layers(model, layout))]
    expected = sum(p.numel() * 2 for m in later for p in m.parameters() if p.dim() == 2)
    assert _values_stage(shape, hp.replace(v_dtype="bfloat16"), 4, 4, suffix=6, prefix=12, target=3)[part] == expected


def test_gate_memory_adds_its_prompts_to_the_calibration_pass(make_tiny):
    """The calibration pass also runs the gate's remembered prompts: its activations grow with gate_memory,
    while the kept stream of the held-back text does not."""
    from comeba.plan import _calibration_stage, _layer_plan

    model = make_tiny("llama")
    hp, shape = HParams(**HP), ModelShape.from_model(model)
    layers = [_layer_plan(l, *shape.mlp_out[l], hp) for l in hp.layers]
    without = _calibration_stage(shape, hp, layers, 4, 4)
    with_memory = _calibration_stage(shape, hp.replace(gate_memory=64), layers, 4, 4)
    stream = "the held-back text's input to the first edited layer (kept by the editor)"
    assert with_memory[stream] == without[stream]
    part = "a layer's activations and gate scores"
    assert with_memory[part] > without[part]
