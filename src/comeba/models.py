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
from typing import Any, Callable

import torch

from .embedded import EMBEDDED, resolve_model_path

log = logging.getLogger(__name__)



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


# --------------------------------------------------------------------------- devices (models dispatched by accelerate)
#
# A model loaded with a device_map (or dispatched with accelerate) runs each module on its own device, and
# an offloaded module holds its weights on the meta device between calls: accelerate's hook (`_hf_hook`,
# an AlignDevicesHook) loads them onto its execution device for the call. So where a module computes is
# the execution device of the nearest accelerate hook on it or above it, not its weight's device.


def _accelerate_hooks(module: torch.nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several


def dispatched(model: torch.nn.Module) -> bool:
    """Whether accelerate's hooks run `model` (a device map, offloading): they move weights in and out around
    each call, so two calls must not run at once."""
    return any(_accelerate_hooks(m) for m in model.modules())


def execution_device(module: torch.nn.Module) -> torch.device | None:
    """The execution device of an accelerate hook on `module` itself (None when it has none)."""
    for hook in _accelerate_hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def module_device(model: torch.nn.Module, name: str) -> torch.device:
    """Where submodule `name` of `model` computes: the execution device of the nearest accelerate hook on it
    or an enclosing module, else the device of its first tensor not on the meta device, else the model's."""
    parts = name.split(".") if name else []
    for i in range(len(parts), -1, -1):
        device = execution_device(get_module(model, ".".join(parts[:i])) if i else model)
        if device is not None:
            return device
    module = get_module(model, name) if name else model
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return input_device(model) if name else torch.device("cpu")


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's input ids go: the execution device of its accelerate hook when dispatched, else the
    device of its input embeddings (never the meta device of offloaded weights)."""
    device = execution_device(model)
    if device is not None:
        return device
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    if embeddings is not None:
        device = execution_device(embeddings)
        if device is not None:
            return device
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
    for tensor in model.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def layer_device(model: torch.nn.Module, layout: Layout, layer: int) -> torch.device:
    """Where decoder layer `layer` computes (its output lives there)."""
    return module_device(model, layout.layer_name(layer))


def has_bf16_matmul(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware (faster than float32, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:  # AMX tiles or AVX-512 BF16 (private but stable helpers; absent in older torch)
            return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
        except AttributeError:
            return False
    return False


def mlp_out_device(model: torch.nn.Module, layout: Layout, layer: int) -> torch.device:
    """Where the MLP output projection of `layer` computes: its keys live there, and so must its hook's tensors."""
    return module_device(model, layout.mlp_out_name(layer))


def _offloaded(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The value of state entry `name` that accelerate keeps off the model (disk or CPU offload), or None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        try:
            module = model.get_submodule(".".join(parts[:i])) if i else model
        except AttributeError:
            continue
        for hook in _accelerate_hooks(module):
            weights = getattr(hook, "weights_map", None)
            if weights is None:
                continue
            try:
                return weights[".".join(parts[i:])]
            except KeyError:
                continue
    return None


def state_tensors(model: torch.nn.Module):
    """(name, tensor) of the model's state in name order, with offloaded weights read from where accelerate keeps
    them, so that a dispatched model has the same fingerprint as the same weights on one device."""
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.device.type == "meta":
            value = _offloaded(model, name)
            if value is None:
                raise ValueError(f"weight {name!r} is on the meta device and no accelerate hook holds its value")
            tensor = value
        yield name, tensor


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument: `cache` in recent transformers 5 releases, `past_key_values` before (5.17 too)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


FINGERPRINT_PREFIX = "w2-"
_WIDTH, _CHUNK = 4096, 1 << 22


def fingerprint(model: torch.nn.Module) -> str:
    """A stable identity of a model's weights, for statistics caches and saved states.

    Per tensor: name, shape, dtype and Σᵢ bitsᵢ·(i mod 4096 + 1) over its raw bits
    read as 16-bit integers. Every partial sum is an integer below 2⁵³, so the
    float64 products and row sums are exact: the same on every device and thread
    count (a float sum of the weights themselves depends on the reduction
    order), and any single changed weight changes it.
    """
    h = hashlib.sha256(b"comeba fingerprint 2")
    for name, tensor in state_tensors(model):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{_bits_checksum(tensor)}".encode())
    return FINGERPRINT_PREFIX + h.hexdigest()[: 32 - len(FINGERPRINT_PREFIX)]


def _bits_checksum(tensor: torch.Tensor) -> int:
    flat = tensor.detach().reshape(-1)
    if flat.device.type == "mps":  # no float64 there
        flat = flat.cpu()
    bits = flat.view(torch.uint8) if flat.element_size() == 1 else flat.view(torch.int16)
    weights = torch.arange(1, _WIDTH + 1, dtype=torch.float64, device=bits.device)
    total = 0
    for start in range(0, bits.numel(), _CHUNK):  # |bits·w| < 2²⁸, a row's sum < 2⁴⁰: exact in float64
        part = bits[start:start + _CHUNK]
        rows = part.numel() // _WIDTH * _WIDTH
        total += int((part[:rows].view(-1, _WIDTH).to(torch.float64) @ weights).to(torch.int64).sum())
        total += int((part[rows:].to(torch.int64) * weights[: part.numel() - rows].to(torch.int64)).sum())
    return total


def legacy_fingerprint(model: torch.nn.Module) -> str:
    """The first fingerprint (float sums, not exact across devices), kept to recognise states and caches made with it."""
    h = hashlib.sha256()
    for name, tensor in state_tensors(model):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].to(torch.float64).cpu().numpy().tobytes())
        h.update(repr(float(flat.to(torch.float64).sum())).encode())
    return h.hexdigest()[:32]


def model_check(model: torch.nn.Module, current: str) -> Callable[[str | None], bool]:
    """Whether a recorded fingerprint names this model (`current` is its fingerprint): an older-format one is
    checked against the legacy fingerprint, computed at most once however often the check is asked."""
    legacy: list[str] = []

    def check(recorded: str | None) -> bool:
        if recorded == current:
            return True
        if not recorded or recorded.startswith(FINGERPRINT_PREFIX):
            return False
        if not legacy:
            legacy.append(legacy_fingerprint(model))
        return recorded == legacy[0]

    return check


def same_model(recorded: str | None, model: torch.nn.Module, current: str) -> bool:
    """`model_check` asked once."""
    return model_check(model, current)(recorded)


def weights_checksum(model: torch.nn.Module) -> str:
    """Full hash of every weight byte: proves the base model was not modified."""
    h = hashlib.sha256()
    for name, tensor in state_tensors(model):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- loading


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


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(spec: str | dict | None) -> str | dict | None:
    """A device map for from_pretrained: a strategy (auto, balanced, balanced_low_0, sequential), a dict of
    module name → device (an int is a CUDA index; "cpu" and "disk" offload), or a JSON file holding such a dict."""
    if spec is None or isinstance(spec, dict):
        return dict(spec) if isinstance(spec, dict) else None
    spec = str(spec)
    if spec in DEVICE_MAPS:
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"device map {spec!r} is neither one of {', '.join(DEVICE_MAPS)} nor a JSON file")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"device map file {spec!r} is not valid JSON: {err}") from None
    if not isinstance(loaded, dict) or not loaded or not all(
            isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool) for k, v in loaded.items()):
        raise ValueError(f"device map file {spec!r} must hold a JSON object of module name → device "
                         '(e.g. {"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": "cpu"})')
    return loaded


def load_model(
    name_or_path: str = EMBEDDED,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for an HF id, a local folder, or `embedded` (SmolLM2-135M-Instruct).

    The model is frozen and in eval mode: comeba never trains or modifies it.
    `dtype` None keeps the checkpoint's; `device` None keeps the CPU, `auto`
    takes CUDA when present. `device_map` (instead of `device`) spreads a model
    too big for one device over several, with CPU or disk offload for the rest:
    "auto", "balanced", a dict of module → device, or a JSON file of one; it is
    passed to transformers' from_pretrained (accelerate places the modules).
    Disk offload writes to `offload_folder` (default: a temporary folder
    removed at exit).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .text import ensure_pad_token

    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if device_map is not None and device is not None and str(device) != "auto":
        raise ValueError("give either a device or a device map, not both")
    device_map = resolve_device_map(device_map)
    target = resolve_device(device) if device is not None and device_map is None else None
    start = time.perf_counter()
    path = resolve_model_path(name_or_path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
        kwargs["offload_folder"] = str(offload_folder) if offload_folder is not None else _temporary_offload_folder()
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
    placed = f" over {describe_device_map(model)}" if device_map is not None else ""
    log.info("loaded %s in %.1f s%s", name_or_path, time.perf_counter() - start, placed)
    return model, tokenizer


def describe_device_map(model: torch.nn.Module) -> str:
    """'cuda:0 (14 modules), cpu (3), disk (2)': where a dispatched model's modules are (the device otherwise)."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return str(input_device(model))
    counts: dict[str, int] = {}
    for where in device_map.values():
        key = f"cuda:{where}" if isinstance(where, int) else str(where)
        counts[key] = counts.get(key, 0) + 1
    parts = [f"{d} ({n}{' modules' if i == 0 else ''})" for i, (d, n) in enumerate(counts.items())]
    return ", ".join(parts)


def _temporary_offload_folder() -> str:
    """A folder for disk-offloaded weights, removed when the process ends."""
    import atexit

    folder = tempfile.mkdtemp(prefix="comeba-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
