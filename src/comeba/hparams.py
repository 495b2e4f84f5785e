"""Hyperparameters, with EasyEdit's key names so existing YAML files load as they are."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

# EasyEdit keys that name modules or devices: our layout table and the caller decide those.
IGNORED_KEYS = {
    "alg_name", "model_name", "device", "layer_selection", "rewrite_module_tmp", "layer_module_tmp",
    "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module", "model_parallel",
    "stats_dir", "max_length", "fp16", "mom2_adjustment", "v_loss_layer",
}
GATES = ("span", "reference")
WRITE_GATES = ("open", "subject")
ACCUMULATED_KEYS = ("combined", "contexts")
FIT_KEYS = ACCUMULATED_KEYS
OPTIMIZERS = ("lbfgs", "adam")
V_DTYPES = ("float32", "bfloat16", "auto")
AUTO_KEY_WEIGHT = 4.0  # `edit_key_weight: auto`: γ below the last edited layer (1 at the last)
ALIASES = {"mom2_n_samples": "mom2_n_tokens", "threshold": "alpha", "init_alpha": "alpha"}


def _setting(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:
    """A field with its help text: the README's hyperparameter table is `markdown_table()` of these."""
    return field(default=default, default_factory=factory, metadata={"help": help})


class HParamsError(ValueError):
    """A hyperparameter file or value that cannot be used."""


@dataclass
class HParams:
    """COMEBA-HK settings (EasyEdit names). Defaults are tuned for the embedded SmolLM2-135M.

    `mom2_update_weight` is λ in C_accu = λ·C0 + Σ KKᵀ with C0 normalised per
    token; `alpha` is the initial gate threshold α₀. `gate` picks the gate
    (comeba.hooks): ``span`` (default; α calibrated after every batch so the
    gate opens on a share `gate_false_open` of held-back general text,
    `gate_calibration_tokens` of it, lowered where the batch's own subjects
    need it down to a share `gate_false_open_max`; `gate_alpha0` before the
    first calibration) or ``reference`` (the authors' z-score rule, α a running
    minimum from `alpha`).
    """

    layers: list[int] = _setting(factory=lambda: [4, 5, 6, 7, 8], help="edited layers (MLP output projections), increasing")
    fact_token: str = _setting(
        "subject_last",
        "where keys and values are read: the subject's last token (the only choice)")
    v_optimizer: str = _setting(
        "lbfgs",
        "target-value optimiser: `lbfgs` (L-BFGS with a trust radius per request; see [Speed](#speed)) or `adam` "
        "(the reference schedule)")
    v_num_grad_steps: int = _setting(
        25,
        "at most this many forward/backward passes per request in the target-value optimisation")
    v_dtype: str = _setting(
        "auto",
        "precision of the layers above l_n while the target values are optimised: `float32`, `bfloat16` (their "
        "projections; attention, norms, head, keys and solves stay float32) or `auto` (bfloat16 where the device "
        "has bfloat16 matrix units: a CPU with AMX or AVX-512 BF16, a CUDA GPU with bf16; float32 elsewhere); "
        "1.2–1.35× faster on such a CPU, within 0.5 point of float32 on the dev cells except CounterFact "
        "generality (−1.2), see [Speed](#speed)")
    v_lr: float = _setting(0.5, "Adam's learning rate; L-BFGS's first trial step is 2 · v_lr · √d long")
    v_weight_decay: float = _setting(1e-3, "weight of ‖δ‖ / ‖h‖² in its loss")
    clamp_norm_factor: float = _setting(4.0, "δ is kept within this × ‖h‖")
    kl_factor: float = _setting(0.0625, "weight of the KL term on the \"{subject} is a\" prompt")
    early_stop_loss: float = _setting(0.05, "stop the optimisation below this loss")
    v_overshoot: float = _setting(
        1.0,
        "c: the batch writes Z = h + c·δ, the found δ stretched by c, so that an edit still holds after later "
        "batches have worn part of its value away (1: as the reference; 1.5 lost 8–10 points of reliability at 1,000 "
        "edits: the stretched step no longer points at the target, see [The gate](#the-gate))")
    write_rounds: int = _setting(
        1,
        "times a batch's residual is spread over the edited layers: each round after the first measures Z − h at l_n "
        "again under the hooks just written and writes it against the same covariance as the first (1: as the "
        "reference and MEMIT, which leave the ridge's shortfall at l_n; 2 lost 1.4 points of reliability at 1,000 edits: "
        "the newest edits keep more of their values and the older ones fade faster, see [The gate](#the-gate))")
    mom2_update_weight: float = _setting(1000.0, "λ in C_accu = λ·C0 + Σ K Kᵀ (C0 normalised per token)")
    edit_key_weight: float | list[float] | str = _setting(
        "auto",
        "γ: weight of the earlier batches' edit keys against a new batch's in its solve, Δ = R Kᵀ (λC0 + γ Σ_past K Kᵀ "
        "+ K Kᵀ)⁻¹ (1: MEMIT's accumulation, where a new batch may move an earlier edit's output as much as it "
        "fits its own; larger keeps earlier edits and fits new ones less); a list gives one γ per edited layer; "
        "`auto`: 4 at every edited layer below the last and 1 at the last, so that the lower layers keep their "
        "earlier edits' outputs and the last one writes what they may not (+2.2 to +3.1 points of reliability at "
        "1,000 edits, see [The gate](#the-gate)); saved states hold the list; other than 1 needs `gate: span`, and "
        "`auto` is 1 with `gate: reference`")
    mom2_dataset: str = _setting(
        "auto",
        "statistics corpus when no `--stats-text`: `auto` (wikitext-103 online, else model samples), `samples`, a"
        " local path, or an HF dataset `NAME[:CONFIG[:SPLIT]]`")
    mom2_n_tokens: int = _setting(100_000, "tokens for the key statistics")
    mom2_dtype: str = _setting("float32", "dtype the statistics are cached in (`float32` / `float64`)")
    alpha: float = _setting(2.2, "reference gate: initial threshold α₀ (α only decreases, batch by batch)")
    gate: str = _setting(
        "span",
        "the gate: `span` (see [The gate](#the-gate)) or `reference` (the authors' z-score rule)")
    gate_false_open: float = _setting(
        1e-3,
        "span gate: α is the (1 − ε) quantile of the gate score on held-back general text, so the gate opens on a"
        " share ε of such tokens")
    gate_false_open_max: float = _setting(
        5e-3,
        "span gate: α is lowered below that quantile only as far as the batch's own edited subjects need to open "
        "the gate, and never below the (1 − this) quantile")
    gate_open_no_context: bool = _setting(
        False,
        "span gate: true makes the calibration also open (as far as `gate_false_open_max` allows) a batch subject "
        "whose key carries no context, the one `comeba edit` warns about; false (the default) leaves such a subject "
        "out, as it does a subject that is its prompt's first token (true lowered α for all text at every batch "
        "holding one, and locality fell to 76.7 at 900 edits: see [The gate](#the-gate))")
    gate_subject_share: float = _setting(
        0.5,
        "span gate: α is at least this share ρ of the median score of the batch's edited subjects, so that keys "
        "much less like an edit than the edits themselves (other subjects ending in the same word) keep the gate "
        "shut; 0 turns this floor off")
    gate_span_beta: float = _setting(
        0.1,
        "span gate: β in H = S (βI + S)⁻¹, how much whitened edit energy a direction needs to count as edited "
        "(smaller: weaker directions count too)")
    gate_layer_mean: bool = _setting(
        True,
        "span gate: gate each layer on the mean of the token's span scores at the edited layers up to it (an "
        "edited subject scores high at all of them, other text rarely does)")
    gate_memory: int = _setting(
        0,
        "span gate: earlier edits (a fixed-size uniform sample of all so far) whose subjects every calibration keeps "
        "open as far as `gate_false_open_max` allows, besides the batch's own; 0 keeps only the batch's (128 at 1,000 "
        "edits cost 13 points of locality for 0.6 of reliability: see [The gate](#the-gate))")
    accumulated_keys: str = _setting(
        "contexts",
        "the keys of a batch that join C_accu and the span gate: `contexts` (each context's key, with the weights "
        "that make their mean the combined key, so later batches keep the edit's output at the keys it is read at) "
        "or `combined` (as the reference: only the one key per edit the solve fits, ½ bare prompt + ½ mean of the "
        "context templates; `contexts` gave 5 to 7 more points of reliability at 1,000 edits, see [The gate](#the-gate))")
    fit_keys: str = _setting(
        "combined",
        "the keys a batch's solve maps to the edit's residual: `combined` (as the reference and MEMIT: Δ fits the "
        "one combined key) or `contexts` (least squares over each context's key with the same weights; the same "
        "R Kᵀ, solved against Σ w_t k_t k_tᵀ instead of K Kᵀ)")
    write_gate: str = _setting(
        "open",
        "hooks while a batch is written: `open` (as the reference: every edited layer outputs W_h·k at every token "
        "until it is written) or `subject` (each layer gated as at inference and open at the subject's last token, "
        "which the batch's calibration opens: residuals are measured on the model inference will run)")
    gate_calibration_tokens: int = _setting(
        4096,
        "span gate: tokens of held-back general text (from the statistics corpus, after the tokens C0 used) that "
        "α is calibrated on, once per batch")
    gate_alpha0: float = _setting(0.1, "span gate: α while the first batch is written, before the first calibration")
    context_template_length: int = _setting(10, "tokens of each generated context prefix")
    context_template_prefixes: list[str] = _setting(factory=lambda: ["The", "Therefore"],
                                                    help="seeds of the context prefixes (with the bare prompt, one "
                                                    "template more than prefixes; see [Speed](#speed))")
    batch_size: int = _setting(30, "edits per consecutive batch (CLI `--batch-size`)")
    seed: int = _setting(0, "seed of the context templates and the sampled-text corpus")
    # AlphaEdit (baseline only; see comeba.alphaedit). The null space of C0 keeps the
    # smallest-eigenvalue directions holding at most `nullspace_energy` of trace(C0), unless
    # `nullspace_threshold` (absolute eigenvalue bound, EasyEdit's key) is set; `L2` weighs ‖ΔP‖².
    nullspace_energy: float = _setting(
        0.05,
        "AlphaEdit baseline only: its null space of C0 is the smallest-eigenvalue directions holding at most this"
        " share of trace(C0)")
    nullspace_threshold: float | None = _setting(
        None,
        "AlphaEdit baseline only: an absolute eigenvalue bound instead (EasyEdit's key)")
    L2: float = _setting(1.0, "AlphaEdit baseline only: weight of ‖ΔP‖² in its solve")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.layers or any(not isinstance(l, int) or l < 0 for l in self.layers):
            raise HParamsError(f"layers must be a non-empty list of layer indices, got {self.layers!r}")
        if sorted(set(self.layers)) != list(self.layers):
            raise HParamsError(f"layers must be increasing and distinct, got {self.layers!r}")
        if self.fact_token != "subject_last":
            raise HParamsError(f"fact_token {self.fact_token!r} is not supported (only 'subject_last')")
        for name in ("v_lr", "mom2_update_weight", "clamp_norm_factor", "v_overshoot"):
            if not getattr(self, name) > 0:
                raise HParamsError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("v_num_grad_steps", "mom2_n_tokens", "batch_size", "write_rounds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise HParamsError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 < self.nullspace_energy < 1:
            raise HParamsError(f"nullspace_energy must be in (0, 1), got {self.nullspace_energy!r}")
        if self.nullspace_threshold is not None and not self.nullspace_threshold > 0:
            raise HParamsError(f"nullspace_threshold must be positive (or null), got {self.nullspace_threshold!r}")
        if self.edit_key_weight == "auto":
            weights = [1.0]
        else:
            weights = self.edit_key_weight if isinstance(self.edit_key_weight, list) else [self.edit_key_weight]
        if (isinstance(self.edit_key_weight, list) and len(weights) != len(self.layers)) or not all(
                isinstance(g, (int, float)) and not isinstance(g, bool) and g > 0 for g in weights):
            raise HParamsError(f"edit_key_weight must be `auto`, a positive number or a list of them, one per edited "
                               f"layer ({len(self.layers)}), got {self.edit_key_weight!r}")
        if any(g != 1 for g in weights) and self.gate != "span":
            raise HParamsError("edit_key_weight other than 1 needs gate: span (the reference gate keeps no C0 to "
                               "weigh the accumulated keys against)")
        if not self.L2 > 0:
            raise HParamsError(f"L2 must be positive, got {self.L2!r}")
        if self.v_optimizer not in OPTIMIZERS:
            raise HParamsError(f"v_optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.v_optimizer!r}")
        if self.v_dtype not in V_DTYPES:
            raise HParamsError(f"v_dtype must be one of {', '.join(V_DTYPES)}, got {self.v_dtype!r}")
        if self.gate not in GATES:
            raise HParamsError(f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.accumulated_keys not in ACCUMULATED_KEYS:
            raise HParamsError(f"accumulated_keys must be one of {', '.join(ACCUMULATED_KEYS)}, "
                               f"got {self.accumulated_keys!r}")
        if self.fit_keys not in FIT_KEYS:
            raise HParamsError(f"fit_keys must be one of {', '.join(FIT_KEYS)}, got {self.fit_keys!r}")
        if self.write_gate not in WRITE_GATES:
            raise HParamsError(f"write_gate must be one of {', '.join(WRITE_GATES)}, got {self.write_gate!r}")
        if not 0 < self.gate_false_open < 1:
            raise HParamsError(f"gate_false_open must be in (0, 1), got {self.gate_false_open!r}")
        if not self.gate_false_open <= self.gate_false_open_max < 1:
            raise HParamsError(f"gate_false_open_max must be in [gate_false_open, 1), got {self.gate_false_open_max!r}")
        if not self.gate_span_beta > 0:
            raise HParamsError(f"gate_span_beta must be > 0, got {self.gate_span_beta!r}")
        for name in ("gate_layer_mean", "gate_open_no_context"):
            if not isinstance(getattr(self, name), bool):
                raise HParamsError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not 0 <= self.gate_subject_share < 1:
            raise HParamsError(f"gate_subject_share must be in [0, 1), got {self.gate_subject_share!r}")
        if not 0 < self.gate_alpha0 < 1:
            raise HParamsError(f"gate_alpha0 must be in (0, 1), got {self.gate_alpha0!r}")
        if not isinstance(self.gate_memory, int) or isinstance(self.gate_memory, bool) or self.gate_memory < 0:
            raise HParamsError(f"gate_memory must be an integer >= 0, got {self.gate_memory!r}")
        if not isinstance(self.gate_calibration_tokens, int) or self.gate_calibration_tokens < 16:
            raise HParamsError(f"gate_calibration_tokens must be an integer >= 16, got {self.gate_calibration_tokens!r}")
        if self.mom2_dtype not in ("float32", "float64"):
            raise HParamsError(f"mom2_dtype must be float32 or float64, got {self.mom2_dtype!r}")

    def key_weight(self, layer: int) -> float:
        """γ of one edited layer (`edit_key_weight` is `auto`, one number or one per layer)."""
        if self.edit_key_weight == "auto":
            return AUTO_KEY_WEIGHT if self.gate == "span" and layer != max(self.layers) else 1.0
        if isinstance(self.edit_key_weight, list):
            return float(self.edit_key_weight[self.layers.index(layer)])
        return float(self.edit_key_weight)

    def check_model(self, n_layers: int) -> None:
        if max(self.layers) >= n_layers:
            raise HParamsError(f"layers {self.layers} out of range: the model has {n_layers} layers (0..{n_layers - 1})")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "HParams":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in values.items():
            key = ALIASES.get(key, key)
            if key in known:
                kwargs[key] = value
            elif key not in IGNORED_KEYS:
                unknown.append(key)
        if unknown:
            raise HParamsError(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise HParamsError(str(err)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "HParams":
        try:
            values = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise HParamsError(f"hyperparameter file {str(path)!r} does not exist") from None
        except yaml.YAMLError as err:
            raise HParamsError(f"hyperparameter file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(values, Mapping):
            raise HParamsError(f"hyperparameter file {str(path)!r} must hold a mapping of keys to values")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self) -> "HParams":
        """These settings with `edit_key_weight: auto` spelled out per layer: a saved state keeps what it was
        written with even if a later version's `auto` differs."""
        if self.edit_key_weight != "auto":
            return self
        return self.replace(edit_key_weight=[self.key_weight(l) for l in self.layers])

    def replace(self, **changes: Any) -> "HParams":
        return dataclasses.replace(self, **changes)


def _markdown_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (str, list)):
        return f"`{json.dumps(value) if isinstance(value, list) else value}`"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def markdown_table() -> str:
    """The hyperparameter table of the README (key, default, meaning), from the fields' defaults and help."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    defaults = HParams()
    for f in dataclasses.fields(HParams):
        rows.append(f"| `{f.name}` | {_markdown_value(getattr(defaults, f.name))} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"
