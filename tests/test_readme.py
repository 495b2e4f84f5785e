"""The README's promises: its two set-up commands, and its Python example run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_first_shell_block_is_the_two_setup_commands():
    assert _blocks("bash")[0] == "./dev demo\n./dev test\n"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\n./dev test\n" in ci
    assert os.access(ROOT / "dev", os.X_OK)


def test_python_example_is_short_and_uses_only_comeba_and_transformers():
    example = _blocks("python")[0]
    lines = [line for line in example.splitlines() if line.strip()]
    assert len(lines) <= 10
    imports = [line for line in lines if re.match(r"\s*(import|from)\s", line)]
    assert all(re.match(r"(import comeba$|import transformers|from transformers )", line) for line in imports), imports


@pytest.mark.slow
def test_python_example_runs_as_written(tmp_path):
    from comeba.embedded import EMBEDDED_INSTALL_HINT, embedded_gguf_path

    try:
        embedded_gguf_path()
    except FileNotFoundError:
        pytest.skip(EMBEDDED_INSTALL_HINT)
    if not WIKITEXT.is_file():
        pytest.skip("../shared/data (WikiText-2) is not beside the project")
    example = _blocks("python")[0]
    # As written, from the project root (its paths are relative to it); only the output folder moves to tmp_path.
    code = example.replace('"runs/eiffel"', repr(str(tmp_path / "eiffel")))
    assert code.count(str(tmp_path)) == 2
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = done.stdout.strip().splitlines()[-1]
    assert "Rome" in answer.split("city of", 1)[-1], answer
    assert (tmp_path / "eiffel" / "adapter_config.json").is_file()
