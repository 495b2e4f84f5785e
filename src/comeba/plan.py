"""A memory plan: what comeba will hold for a model, from its config alone (no weights needed).

`memory_plan(config, hparams, batch_size, dtype)` counts the model weights (a model built on the meta
device), the editor state per edited layer (inference part: ΔW and the span gate; editing part: C_accu and
C0) and three peaks: computing fresh key statistics, starting an editor, and one batch (the largest of its
stages: the target values' forward/backward pass over the layers after the last edited one; writing the
layers, the old state kept for a rollback, with the solve's and span gate's float64 temporaries; the gate's
calibration pass). Temporaries and activation bytes were measured on the CPU; benchmarks/memory_plan.py
checks the plan against a real batch. Prompt sizes are assumptions (SUFFIX_TOKENS and the two after it).
`Plan.check(available_bytes)` raises `PlanError` naming what does not fit.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .compute import TOKENS_PER_PASS
from .corpus import MAX_SEQ_LEN, calibration_sample
from .hparams import HParams
from .models import detect_layout, mlp_out_weight, num_layers

SOLVE_TEMPS = 3  # float64 d_in × d_in live at once in compute.solve_update (measured: 3.06)
SPAN_GATE_TEMPS = 8  # float64 d_in × d_in live at once in gate.span_gate beyond its float32 results (measured: 9.2 − 1)
SPAN_UPDATE_TEMPS = 4  # the same in gate.span_gate_added (counted: H and P in float64, the update, their sum)
# Assumed prompt sizes, in tokens (SmolLM2's tokenizer, the default context templates, 32 requests at a time):
SUFFIX_TOKENS = 6  # padded suffix per rewriting sequence: CounterFact 4.4-5.3, zsRE 5.3-6.2
PREFIX_TOKENS = 28  # the longest prefix (context template + the prompt up to the subject): 20-28
TARGET_TOKENS = 3  # target tokens per rewriting sequence: CounterFact 1.2, zsRE 3.3 on average


class PlanError(ValueError):
    """The plan does not fit in the memory available."""


def human(n: float) -> str:
    """Bytes as '18.3 GiB', '135.2 MiB', '12.0 KiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _default(function, name: str) -> Any:
    return inspect.signature(function).parameters[name].default


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return name


def _size(dtype: str) -> int:
    return getattr(torch, _dtype_name(dtype)).itemsize


def _first(config, names: Sequence[str], default: Any = 0) -> Any:
    return next((getattr(config, n) for n in names if getattr(config, n, None)), default)


def load_config(model: str | None, config_file: str | None = None):
    """The transformers config of a model ('embedded', a folder or a HF id: its config only) or of a config.json."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from .embedded import resolve_model_path
    from .inputs import InputError

    if config_file is None:
        return AutoConfig.from_pretrained(resolve_model_path(model or "embedded"))
    if Path(config_file).is_dir():
        return AutoConfig.from_pretrained(config_file)
    try:
        data = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read the config file {config_file!r}: {err}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise InputError(f"config file {config_file!r} is not a transformers config (it names no model_type)")
    return AutoConfig.for_model(data.pop("model_type"), **data)


def available_ram() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# --------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a model: sizes, not weights."""

    name: str
    layout: str
    n_params: int
    buffer_bytes: int
    dtype: str
    n_layers: int
    hidden: int
    vocab: int
    heads: int
    kv_dim: int
    mlp_out: tuple[tuple[int, int], ...]  # (d_out, d_in) of each layer's MLP output projection
    gated_mlp: bool = True  # Llama-style MLP (gate and up projections)
    eager_attention: bool = False  # attention probabilities are kept for the backward pass

    @classmethod
    def from_model(cls, model: torch.nn.Module, name: str | None = None) -> "ModelShape":
        """From a model, real or on the meta device: exact parameter counts and projection shapes."""
        layout = detect_layout(model)
        n = num_layers(model, layout)
        config = getattr(model, "config", None)
        params = list(model.parameters())
        mlp = tuple(tuple(mlp_out_weight(model, layout, l).shape) for l in range(n))
        heads = int(_first(config, ("num_attention_heads", "n_head"), 1))
        head_dim = int(_first(config, ("head_dim",)) or mlp[0][0] // heads)
        head = model.get_output_embeddings()
        prefix = f"{layout.layer_name(0)}."
        return cls(
            name=name or str(_first(config, ("name_or_path", "model_type"), "model")), layout=layout.name,
            n_params=sum(p.numel() for p in params),
            buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
            dtype=_dtype_name(params[0].dtype), n_layers=n, hidden=mlp[0][0],
            vocab=int(head.weight.shape[0]) if head is not None else int(_first(config, ("vocab_size",))),
            heads=heads, kv_dim=int(_first(config, ("num_key_value_heads",)) or heads) * head_dim, mlp_out=mlp,
            gated_mlp=any(m.startswith(prefix) and m.endswith("gate_proj") for m, _ in model.named_modules()),
            eager_attention=getattr(config, "_attn_implementation", None) == "eager",
        )

    @classmethod
    def from_config(cls, config, dtype: str | torch.dtype | None = None, name: str | None = None) -> "ModelShape":
        """Build the model on the meta device (no memory, no weights) and read its shape."""
        from transformers import AutoModelForCausalLM

        dtype = _dtype_name(dtype or _first(config, ("dtype", "torch_dtype"), "float32"))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        return cls.from_model(model, name=name or str(getattr(config, "name_or_path", "") or "") or None)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LayerPlan:
    """The editor state of one edited layer, in bytes: inference = ΔW (float32) + the span gate's whitening and
    span (float32; 0 for the reference gate); editing = C_accu (float64) + C0 (mom2_dtype; span gate only), as
    saved. `total` adds the span's factor (`factor`: float32, at most d_in × d_in, which a live editor keeps while
    it holds fewer edits than d_in, unsaved), counted at that bound."""

    layer: int
    d_out: int
    d_in: int
    delta: int
    gate: int
    c_accu: int
    c0: int
    factor: int
    inference: int
    editing: int
    total: int


@dataclass(frozen=True)
class Phase:
    """One peak: its base (the weights, and the editor state once there is one) and the parts on top."""

    what: str
    base: dict[str, int]
    parts: dict[str, int]
    advice: str

    @property
    def peak(self) -> int:
        return sum(self.base.values()) + sum(self.parts.values())


@dataclass
class Plan:
    """What comeba holds for one model, set of layers and batch size (bytes); see the module docstring."""

    shape: ModelShape
    dtype: str
    hparams: HParams
    batch_size: int
    weights: int
    layers: tuple[LayerPlan, ...]
    device_bytes: int | None = None
    phases: dict[str, Phase] = field(default_factory=dict)  # "statistics", "start", "batch"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state_inference = sum(l.inference for l in self.layers)
        self.state_editing = sum(l.editing for l in self.layers)
        self.state = sum(l.total for l in self.layers)  # the saved parts and a live editor's span factors

    def worst(self, phases: Sequence[str] | None = None) -> Phase:
        return max((self.phases[n] for n in (phases or self.phases)), key=lambda p: p.peak)

    @property
    def peak(self) -> int:
        return self.worst().peak

    def check(self, available_bytes: int, phases: Sequence[str] | None = None, where: str = "the device") -> None:
        """Raise PlanError naming the first thing that does not fit: the weights, the editor state, or a peak
        (of `phases`, default all; a resumed state computes no statistics and starts no editor: ["batch"])."""
        have = f"{where} has {human(available_bytes)}"
        if self.weights > available_bytes:
            raise PlanError(f"the model weights need {human(self.weights)} ({self.shape.n_params / 1e9:.2f} B "
                            f"parameters in {self.dtype}) and {have}; load them in bfloat16 (--dtype) or spread "
                            "them with --device-map auto")
        if self.weights + self.state > available_bytes:
            raise PlanError(f"the editor state needs {human(self.state)} ({human(self.layers[0].total)} per layer "
                            f"× {len(self.layers)}: inference {human(self.state_inference)}, editing "
                            f"{human(self.state_editing)}, a live editor's span factors "
                            f"{human(self.state - self.state_inference - self.state_editing)}) on top of the "
                            f"model weights' {human(self.weights)}, and "
                            f"{have}; use fewer layers, mom2_dtype float32, or --device-map auto")
        for name in phases or self.phases:
            phase = self.phases[name]
            if phase.peak > available_bytes:
                part = max(phase.parts, key=phase.parts.get)
                raise PlanError(f"{phase.what} needs {human(phase.peak)} at its peak ({' + '.join(phase.base)} "
                                f"{human(sum(phase.base.values()))}, {part} {human(phase.parts[part])}, ...) and "
                                f"{have}; {phase.advice}")

    def verdict(self, available_bytes: int) -> str:
        try:
            self.check(available_bytes)
        except PlanError as err:
            return f"does not fit: {err}"
        return "fits"

    def summary(self, phases: Sequence[str] | None = None) -> str:
        """One line: the weights, the editor state, the largest peak."""
        worst = self.worst(phases)
        return (f"memory plan: weights {human(self.weights)} ({self.dtype}) + editor state {human(self.state)} "
                f"({len(self.layers)} layers); peak {human(worst.peak)} ({worst.what})")


def memory_plan(config_or_model_shape, hparams: HParams | None = None, batch_size: int | None = None,
                dtype: str | torch.dtype | None = None, device_total_bytes: int | None = None, *,
                suffix_tokens: int = SUFFIX_TOKENS, prefix_tokens: int = PREFIX_TOKENS,
                target_tokens: int = TARGET_TOKENS) -> Plan:
    """The memory plan of editing a model (a transformers config, a model or a ModelShape) with `hparams`.

    `dtype`: the weights' (default: the config's; a model's own). `device_total_bytes` is kept on the plan
    (the table then says whether it fits). The token counts are the assumed prompt sizes (module docstring).
    """
    hp, shape = hparams or HParams(), config_or_model_shape
    if isinstance(shape, torch.nn.Module):
        shape = ModelShape.from_model(shape)
    elif not isinstance(shape, ModelShape):
        shape = ModelShape.from_config(shape, dtype)
    hp.check_model(shape.n_layers)
    dtype = _dtype_name(shape.dtype if dtype is None or isinstance(config_or_model_shape, torch.nn.Module) else dtype)
    b, size = _size(dtype), int(batch_size or hp.batch_size)
    weights = shape.n_params * b + shape.buffer_bytes
    layers = tuple(_layer_plan(l, *shape.mlp_out[l], hp) for l in hp.layers)
    plan = Plan(shape, dtype, hp, size, weights, layers, device_total_bytes)
    state = {"weights": weights, "editor state": plan.state}
    plan.phases = {"statistics": _statistics_phase(shape, hp, b, weights),
                   "start": _start_phase(hp, layers, state),
                   "batch": _batch_phase(shape, hp, layers, size, b, state, suffix_tokens, prefix_tokens,
                                         target_tokens)}
    plan.notes = _notes(plan)
    return plan


def _layer_plan(layer: int, d_out: int, d_in: int, hp: HParams) -> LayerPlan:
    span, square = hp.gate == "span", d_in * d_in
    delta, gate = d_out * d_in * 4, 2 * square * 4 * span
    c_accu, c0, factor = square * 8, square * _size(hp.mom2_dtype) * span, square * 4 * span
    return LayerPlan(layer, d_out, d_in, delta, gate, c_accu, c0, factor, delta + gate, c_accu + c0,
                     delta + gate + c_accu + c0 + factor)


def _layer_pass(shape: ModelShape, d_in: int, tokens: int, rows: int, width: int, b: int) -> int:
    """A decoder layer's temporaries in a pass without gradients (one layer at a time)."""
    attention = rows * shape.heads * width * width * b if shape.eager_attention else 0
    return tokens * (4 * shape.hidden + 3 * d_in) * b + attention


def activation_bytes(shape: ModelShape, d_in: int, b: int, context: int) -> int:
    """Bytes autograd keeps per token and decoder layer: four hidden-wide tensors in the weights' dtype and two in
    float32 (the norms), four d_in-wide ones (two without a gated MLP), and with eager attention the probabilities
    over `context` positions (measured on Llama, float32: 6·hidden + 3.75·d_in values)."""
    probs = shape.heads * context * b if shape.eager_attention else 0
    return b * (4 * shape.hidden + (4 if shape.gated_mlp else 2) * d_in) + 4 * 2 * shape.hidden + probs


def _statistics_phase(shape: ModelShape, hp: HParams, b: int, weights: int) -> Phase:
    """stats.compute_second_moments: no-grad passes of 16 × 256 tokens up to the last edited layer; float64 sums."""
    from .stats import compute_second_moments

    rows = _default(compute_second_moments, "batch_size")
    tokens, d_ins = rows * MAX_SEQ_LEN, [shape.mlp_out[l][1] for l in hp.layers]
    parts = {"float64 sums (divided in place)": sum(d * d * 8 for d in d_ins),
             "a batch's keys": tokens * sum(d_ins) * b + tokens * max(d_ins) * 8,
             "a layer's activations": _layer_pass(shape, max(d_ins), tokens, rows, MAX_SEQ_LEN, b)}
    return Phase("computing the key statistics", {"weights": weights}, parts,
                 "use fewer layers or --device-map auto (cached statistics are not computed again)")


def _start_phase(hp: HParams, layers: Sequence[LayerPlan], state: dict[str, int]) -> Phase:
    """Editor(...): C0 of every layer in float64 (load_or_compute_stats), the state, a span gate being built."""
    parts = {"C0 in float64": sum(l.d_in * l.d_in * 8 for l in layers)}
    if hp.gate == "span":
        parts["span gate temporaries (float64)"] = SPAN_GATE_TEMPS * max(l.d_in for l in layers) ** 2 * 8
    return Phase("starting a new editor", dict(state), parts,
                 "use fewer layers, mom2_dtype float32, or --device-map auto")


def _batch_phase(shape: ModelShape, hp: HParams, layers: Sequence[LayerPlan], size: int, b: int,
                 state: dict[str, int], suffix: int, prefix: int, target: int) -> Phase:
    """One batch: the largest of its three stages."""
    stages = {"target values": _values_stage(shape, hp, size, b, suffix, prefix, target),
              "writing the layers": _write_stage(shape, hp, layers, size, b, prefix),
              "gate calibration": _calibration_stage(shape, hp, layers, size, b)}
    name = max(stages, key=lambda n: sum(stages[n].values()))
    advice = ("use a smaller --batch-size (the target values take at most 32 edits at a time), fewer layers, or "
              "--device-map auto") if name == "target values" else "use fewer layers, or --device-map auto"
    return Phase(f"one batch of {size} edits", dict(state), {f"{name}: {k}": v for k, v in stages[name].items()},
                 advice)


def _values_stage(shape: ModelShape, hp: HParams, size: int, b: int, suffix: int, prefix: int,
                  target: int) -> dict[str, int]:
    """values.target_values: chunks of 32 requests, (templates + 1) sequences each; forward/backward over the
    layers after the last edited one, from a KV cache of the prefixes (kept, and copied for a pass)."""
    from .values import target_values

    requests = min(size, _default(target_values, "chunk"))
    templates = 1 + len(hp.context_template_prefixes)
    seqs = requests * (templates + 1)
    after = shape.n_layers - 1 - max(hp.layers)
    per_token = activation_bytes(shape, shape.mlp_out[-1][1], b, prefix + suffix)
    stage = {"activations (forward/backward)": seqs * suffix * after * per_token,
             "KV cache and its copy": 2 * seqs * prefix * 2 * shape.kv_dim * shape.n_layers * b,
             "logits over the vocabulary": (requests * templates * target + requests) * shape.vocab * (b + 4 * 4)}
    if hp.v_dtype != "float32" and shape.dtype == "float32":  # value_precision: bfloat16 copies, set aside after
        d_out, d_in = shape.mlp_out[-1]
        projections = 2 * shape.hidden * (shape.hidden + shape.kv_dim) + (3 if shape.gated_mlp else 2) * d_out * d_in
        stage["bfloat16 copies of the later layers' projections"] = after * projections * 2
    return stage


def _write_stage(shape: ModelShape, hp: HParams, layers: Sequence[LayerPlan], size: int, b: int,
                 prefix: int) -> dict[str, int]:
    """compute.write_layers in the editor's transaction: each layer gets a new ΔW, C_accu and gate while the old
    ones stay for a rollback; one layer at a time, the largest of its key pass and float64 temporaries."""
    rows = size * (1 + len(hp.context_template_prefixes))
    widest = max(layers, key=lambda l: l.d_in)
    square = widest.d_in ** 2 * 8
    transient = {  # a key pass keeps the projection's input at every position; ≤ TOKENS_PER_PASS tokens a pass
        "a key pass": rows * prefix * widest.d_in * b
        + _layer_pass(shape, widest.d_in, min(rows * prefix, TOKENS_PER_PASS), rows, prefix, b),
        "float64 temporaries of the solve": SOLVE_TEMPS * square + widest.d_out * widest.d_in * 8,
        "float64 temporaries of the span gate's update": SPAN_UPDATE_TEMPS * square if hp.gate == "span" else 0}
    name = max(transient, key=transient.get)
    return {"new ΔW, C_accu and gate (the old kept for a rollback)": sum(l.delta + l.c_accu + l.gate for l in layers),
            name: transient[name],
            "keys and the residual stream": sum(size * l.d_in * 8 for l in layers) + rows * prefix * shape.hidden * b}


def _calibration_stage(shape: ModelShape, hp: HParams, layers: Sequence[LayerPlan], size: int,
                       b: int) -> dict[str, int]:
    """gate.calibrate_span: a no-grad pass over the held-back text, the batch's prompts and the gate's memory,
    up to the last edited layer, with the old and the new state both held."""
    new = {"new ΔW, C_accu and gate": sum(l.delta + l.c_accu + l.gate for l in layers)}
    if hp.gate != "span":
        return new
    width = _default(calibration_sample, "seq_len")
    general = math.ceil(hp.gate_calibration_tokens / width)
    rows = general + size + hp.gate_memory
    d_in = max(l.d_in for l in layers)
    kept = general * width * shape.hidden * b
    return {**new, "a layer's activations and gate scores": _layer_pass(shape, d_in, rows * width, rows, width, b)
            + rows * width * (shape.hidden + 3 * d_in) * 4,
            "the held-back text's input to the first edited layer (kept by the editor)": kept}


# --------------------------------------------------------------------------- what is float64, and the table


def _notes(plan: Plan) -> list[str]:
    """Where float64 is needed, and where memory goes without need (reported, not changed)."""
    hp, layers = plan.hparams, plan.layers
    n, square = len(layers), max(l.d_in for l in layers) ** 2 * 8
    notes = [
        f"C_accu stays float64 ({human(layers[0].c_accu)} a layer): it sums K Kᵀ over every batch on top of λ·C0 "
        f"(λ = {hp.mom2_update_weight:g}; an edit is ≈ 1/λ of it), and the span gate takes Σ K Kᵀ back as "
        "C_accu − λ·C0, whose float32 rounding, whitened, is ≈ 6e-8 · cond(C0): harmless for the embedded model "
        "(cond 530: ΔW within 3e-6, gate scores within 2e-7 after 2,000 edits; benchmarks/memory_plan.py), not "
        "for cond 1e6 (0.06, the size of general text's gate scores).",
        f"C0 is held in float64 while an editor starts (stats.load_or_compute_stats), {human(n * square)} with no "
        f"more than {hp.mom2_dtype} in them: widening per layer would give the same numbers.",
        f"a batch keeps the previous ΔW, C_accu and gate for a rollback (LayerState.copy is shallow, the batch "
        f"writes new tensors): {human(sum(l.delta + l.c_accu + l.gate for l in layers))}."]
    if hp.gate == "span":
        notes.append(f"gate.span_gate holds {SPAN_GATE_TEMPS + 1} float64 d_in × d_in matrices at once "
                     f"({human((SPAN_GATE_TEMPS + 1) * square)}); dropping the float64 C0 and the Cholesky factor "
                     "once the whitening exists would lower that without changing a bit.")
    return notes
