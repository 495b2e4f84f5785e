"""The saved state, shaped like a PEFT adapter: an inference part and an editing part, written as one unit.

A state folder holds

- ``adapter_config.json``: sorted, deterministic JSON (no timestamps): the
  base model, the gate, α per edited module, the hyperparameters, the counts,
  and the SHA-256 of each tensor file;
- ``adapter_model.safetensors``: what inference needs, keyed by module path:
  ``<module>.delta`` (ΔW, float32) and, for the span gate,
  ``<module>.gate.whiten`` and ``<module>.gate.span``;
- ``editor_state.safetensors`` (unless the state was saved as final): what
  further editing needs: ``<module>.c_accu`` (float64), ``<module>.c0``, the
  gate's calibration text and memory (``memory.ids``, ``memory.lengths``,
  ``memory.subjects``: the kept earlier edits' prompts); its JSON metadata holds the context templates and
  the statistics' provenance.

The whole folder is replaced in one step (comeba.files.replacing_directory),
so a reader or a crash sees the old state or the new one. States of format
version 1 (``comeba_config.json`` + ``state-*.safetensors``) still load. See
docs/state-format.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .files import TMP_PREFIX, replacing_directory, sha256_file, writer_lock
from .gate import Remembered, SpanGate, span_gate
from .hooks import HookLayers, LayerState
from .models import detect_layout, fingerprint, mlp_out_device, mlp_out_weight, num_layers, same_model
from .text import pad_batch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EDITING_STATE = "editor_state.safetensors"
LEGACY_CONFIG = "comeba_config.json"
FORMAT = "comeba-hook-layers"
FORMAT_VERSION = 2
_OWN = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, EDITING_STATE, LEGACY_CONFIG}


class StateError(ValueError):
    """A saved editor state that cannot be used (missing, damaged, or made for another model)."""


@dataclass
class SavedState:
    """A state folder as read: the config, the hook layers by layer index (with C_accu and C0 when the
    editing part was read), and the editing metadata and calibration text (None when not read or final)."""

    config: dict[str, Any]
    layers: dict[int, LayerState]
    editing: dict[str, Any] | None = None
    calibration: list[list[int]] | None = None
    memory: list[Remembered] | None = None  # the span gate's kept earlier edits (None when not read or final)


def _padded(name: str, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Token-id sequences as `<name>.ids` (right-padded) and `<name>.lengths`, as the editing state keeps them."""
    ids, mask = pad_batch(seqs, 0)
    return {f"{name}.ids": ids, f"{name}.lengths": mask.sum(1)}


def _unpadded(directory: Path, tensors: Mapping[str, torch.Tensor], name: str) -> list[list[int]]:
    """The sequences `_padded` wrote under `name`; a missing or mismatched part is a StateError, not a KeyError."""
    try:
        ids, lengths = tensors[f"{name}.ids"], tensors[f"{name}.lengths"]
    except KeyError as err:
        raise StateError(f"editor state in {directory} lacks tensor {err}") from None
    if ids.dim() != 2 or lengths.shape != (ids.shape[0],) or bool((lengths > ids.shape[1]).any()):
        raise StateError(f"editor state in {directory}: {name}.ids {tuple(ids.shape)} and {name}.lengths "
                         f"{tuple(lengths.shape)} do not match")
    return [row[: int(n)].tolist() for row, n in zip(ids, lengths)]


def _own(name: str) -> bool:
    return name in _OWN or name.startswith(TMP_PREFIX) or (name.startswith("state-") and name.endswith(".safetensors"))


def write_state(directory: str | Path, config: Mapping[str, Any], layers: Mapping[int, LayerState],
                modules: Mapping[int, str], editing: Mapping[str, Any] | None,
                calibration: list[list[int]] | None, memory: Sequence[Remembered] = ()) -> Path:
    """Write a state folder in one step; `editing=None` writes only the inference part (a final state)."""
    directory = Path(directory)
    with writer_lock(directory), replacing_directory(directory, keep=lambda name: not _own(name)) as tmp:
        weights: dict[str, torch.Tensor] = {}
        for l, s in layers.items():
            weights[f"{modules[l]}.delta"] = s.delta.detach().cpu().contiguous()
            if s.span is not None:
                weights[f"{modules[l]}.gate.whiten"] = s.span.whiten.detach().cpu().contiguous()
                weights[f"{modules[l]}.gate.span"] = s.span.span.detach().cpu().contiguous()
        save_file(weights, str(tmp / ADAPTER_WEIGHTS))
        files = {ADAPTER_WEIGHTS: sha256_file(tmp / ADAPTER_WEIGHTS)}
        if editing is not None:
            state: dict[str, torch.Tensor] = {}
            for l, s in layers.items():
                state[f"{modules[l]}.c_accu"] = s.c_accu.detach().cpu().contiguous()
                if s.c0 is not None:
                    state[f"{modules[l]}.c0"] = s.c0.detach().cpu().contiguous()
            if calibration:
                state.update(_padded("calibration", calibration))
            if memory:
                state.update(_padded("memory", [list(m.ids) for m in memory]))
                state["memory.subjects"] = torch.tensor([m.subject for m in memory])
            save_file(state, str(tmp / EDITING_STATE), metadata={"editing": json.dumps(editing, sort_keys=True)})
            files[EDITING_STATE] = sha256_file(tmp / EDITING_STATE)
        full = {**config, "format": FORMAT, "format_version": FORMAT_VERSION, "files": files,
                "final": editing is None,
                "modules": {modules[l]: {"layer": l, "alpha": s.alpha} for l, s in layers.items()}}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(full, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The saved config (format 2, or format 1 as saved), with errors that say what is wrong with the folder."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    legacy = not path.is_file() and (directory / LEGACY_CONFIG).is_file()
    if legacy:
        path = directory / LEGACY_CONFIG
    if not path.is_file():
        raise StateError(f"{directory} holds no comeba editor state ({ADAPTER_CONFIG} missing)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StateError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        fmt = config.get("format") if isinstance(config, dict) else None
        raise StateError(f"{path} is not a comeba editor state (format {fmt!r})")
    expected = 1 if legacy else FORMAT_VERSION
    if config.get("format_version") != expected:
        raise StateError(f"{path} has format version {config.get('format_version')}, this comeba reads "
                         f"{FORMAT_VERSION} (and 1 as comeba_config.json)")
    return config


def read_state(directory: str | Path, editing: bool = True) -> SavedState:
    """Read a state folder (verified against its checksums); `editing=False` reads only the inference part.

    A writer may replace the folder between reading its config and its
    tensors; the read is then retried on the new state.
    """
    directory = Path(directory)
    previous = None
    for attempt in range(3):
        config = read_config(directory)
        try:
            if config["format_version"] == 1:
                return _read_v1(directory, config)
            return _read_v2(directory, config, editing)
        except (StateError, FileNotFoundError) as err:
            try:
                now = read_config(directory)
            except StateError:
                now = None
            if now is None or now == config or now == previous or attempt == 2:  # not a replaced state
                if isinstance(err, FileNotFoundError):
                    raise StateError(f"{directory}: {Path(err.filename or '?').name} named in its config is "
                                     "missing") from None
                raise
            previous = config
    raise AssertionError("unreachable")


def _load(directory: Path, name: str, sha: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(2, "missing", str(path))
    if sha is not None and sha256_file(path) != sha:
        raise StateError(f"editor state in {directory} is damaged: {name} does not match the checksum "
                         "recorded when it was saved; it was not loaded")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StateError(f"editor state in {directory}: {name} cannot be read (truncated or damaged: "
                         f"{first})") from None


def _finite(directory: Path, what: str, layer: int, t: torch.Tensor | None) -> None:
    if t is not None and not bool(torch.isfinite(t).all()):
        raise StateError(f"editor state in {directory} is damaged: {what} of layer {layer} holds NaN or "
                         "infinite values; it was not loaded")


# Settings that states saved before them were made with (so that such a state goes on as it was made).
EARLIER_DEFAULTS = {"gate_span_beta": 1.0, "gate_layer_mean": False, "gate_memory": 0, "write_gate": "open",
                    "accumulated_keys": "combined", "fit_keys": "combined", "edit_key_weight": 1.0,
                    "gate_open_no_context": True}


def _read_v2(directory: Path, config: dict[str, Any], editing: bool) -> SavedState:
    config = {**config, "hparams": {**EARLIER_DEFAULTS, **config["hparams"]}}
    files = config.get("files", {})
    weights, _ = _load(directory, ADAPTER_WEIGHTS, files.get(ADAPTER_WEIGHTS))
    state, meta = ({}, {})
    if editing:
        if config.get("final") or EDITING_STATE not in files:
            raise StateError(f"the editor state in {directory} was saved as final (inference only): it can be "
                             "applied with comeba.load_edits but not edited further")
        state, meta = _load(directory, EDITING_STATE, files[EDITING_STATE])
    layers = {}
    for module, entry in config["modules"].items():
        l = int(entry["layer"])
        try:
            delta = weights[f"{module}.delta"]
            span = (SpanGate(weights[f"{module}.gate.whiten"], weights[f"{module}.gate.span"])
                    if config["hparams"].get("gate", "span") == "span" else None)
            c_accu = state[f"{module}.c_accu"] if editing else None
        except KeyError as err:
            raise StateError(f"editor state in {directory} lacks tensor {err}") from None
        c0 = state.get(f"{module}.c0") if editing else None
        gate = (span.whiten, span.span) if span is not None else (None, None)
        for what, t in (("ΔW", delta), ("C_accu", c_accu), ("C0", c0), ("the gate's whitening", gate[0]),
                        ("the gate's span", gate[1])):
            _finite(directory, what, l, t)
        layers[l] = LayerState(delta, float(entry["alpha"]), span, c_accu, c0)
    calibration = None
    if "calibration.ids" in state:
        calibration = _unpadded(directory, state, "calibration")
    memory = None
    if editing:
        memory = []
        if "memory.ids" in state:
            sequences, subjects = _unpadded(directory, state, "memory"), state.get("memory.subjects")
            if subjects is None or subjects.shape != (len(sequences),):
                raise StateError(f"editor state in {directory} has {len(sequences)} remembered prompts but "
                                 f"memory.subjects is {'missing' if subjects is None else tuple(subjects.shape)}")
            memory = [Remembered(tuple(ids), int(j)) for ids, j in zip(sequences, subjects)]
    return SavedState(config, dict(sorted(layers.items())), json.loads(meta["editing"]) if editing else None,
                      calibration, memory)


def _read_v1(directory: Path, config: dict[str, Any]) -> SavedState:
    """Format 1: one tensor file keyed by layer number, named in comeba_config.json; the span gate is rebuilt."""
    tensors, _ = _load(directory, config.get("tensors", ""), config.get("tensors_sha256"))
    # states saved before the span gate used the reference gate; before the subject floor, none
    hp = {"gate": "reference", "gate_subject_share": 0.0, **EARLIER_DEFAULTS, **config["hparams"]}
    layers = {}
    for l in hp["layers"]:
        try:
            delta, c_accu = tensors[f"delta.{l}"], tensors[f"c_accu.{l}"]
        except KeyError as err:
            raise StateError(f"editor state in {directory} lacks tensor {err}") from None
        c0 = tensors.get(f"c0.{l}")
        if hp["gate"] == "span" and (c0 is None or c0.shape != c_accu.shape):
            raise StateError(f"editor state in {directory} lacks the span gate's C0 of layer {l}")
        for what, t in (("ΔW", delta), ("C_accu", c_accu), ("C0", c0)):
            _finite(directory, what, l, t)
        span = span_gate(c0, c_accu, hp["mom2_update_weight"], hp["gate_span_beta"]) if hp["gate"] == "span" else None
        layers[l] = LayerState(delta, float(config["alpha"][str(l)]), span, c_accu, c0 if hp["gate"] == "span" else None)
    calibration = None
    if hp["gate"] == "span":
        if "calibration.ids" not in tensors:
            raise StateError(f"editor state in {directory} lacks the span gate's calibration text")
        calibration = _unpadded(directory, tensors, "calibration")
    converted = {**config, "hparams": hp, "final": False}
    editing = {"context_templates": config["context_templates"], "statistics": config.get("statistics") or {}}
    return SavedState(converted, layers, editing, calibration, [])


def check_base_model(saved: SavedState, model, directory: str | Path) -> str:
    """Refuse a state made for another model, or whose tensors do not fit this one; returns the fingerprint."""
    fp = fingerprint(model)
    base = saved.config["base_model"]
    if not same_model(base.get("fingerprint"), model, fp):
        raise StateError(
            f"the editor state in {directory} was made for base model {base.get('name_or_path')!r} "
            f"(fingerprint {base.get('fingerprint')}), but the given model "
            f"{getattr(model, 'name_or_path', '?')!r} has fingerprint {fp}: load the state onto the model it was made "
            "for, in the dtype it was made in"
        )
    layout = detect_layout(model)
    for l, st in saved.layers.items():
        if l >= num_layers(model, layout):
            raise StateError(f"editor state in {directory}: layer {l} is beyond the model's layers")
        w0 = mlp_out_weight(model, layout, l)
        d_in = w0.shape[1]
        if tuple(st.delta.shape) != tuple(w0.shape) or (st.c_accu is not None and st.c_accu.shape != (d_in, d_in)):
            raise StateError(f"editor state in {directory}: layer {l} tensors do not match the model's shapes")
    return fp


# ---------------------------------------------------------------------------- α and generation


class AppliedEdits:
    """Edits put on a model for inference by `load_edits`: the hooks are on until `disable()` or `remove()`."""

    def __init__(self, model, layers: Mapping[int, LayerState], config: Mapping[str, Any]):
        self.model = model
        self.config = dict(config)
        self.layers = dict(layers)
        self._layout = detect_layout(model)
        self._hooks: HookLayers | None = None
        self._removed = False
        self.enable()

    @property
    def n_edits(self) -> int:
        return int(self.config.get("n_edits", 0))

    @property
    def enabled(self) -> bool:
        return self._hooks is not None

    def enable(self) -> None:
        """Make the model answer as edited (no-op if already enabled)."""
        if self._removed:
            raise RuntimeError("these edits were removed from the model; load them again with comeba.load_edits")
        if self._hooks is None:
            self._hooks = HookLayers(self.model, self._layout, self.layers,
                                     layer_mean=bool(self.config["hparams"]["gate_layer_mean"]))

    def disable(self) -> None:
        """Make the model answer as the base model again (the edits stay loaded)."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def remove(self) -> None:
        """Take the edits off the model for good."""
        self.disable()
        self._removed = True

    @contextmanager
    def disabled(self) -> Iterator["AppliedEdits"]:
        """The base model inside the block; the previous state after it."""
        was = self.enabled
        self.disable()
        try:
            yield self
        finally:
            if was:
                self.enable()

    def __repr__(self) -> str:
        return (f"AppliedEdits({self.n_edits} edits, layers {sorted(self.layers)}, "
                f"{'enabled' if self.enabled else 'disabled'})")


def load_edits(model, directory: str | Path) -> AppliedEdits:
    """Put the edits saved in `directory` on `model` (the one they were made for) for inference: hooks on.

    Reads only the inference part (ΔW, α and the gate per layer); needs no
    tokenizer. Returns a handle with `disable()`, `enable()`, `remove()` and
    `with handle.disabled():`.
    """
    saved = read_state(directory, editing=False)
    check_base_model(saved, model, directory)
    layout = detect_layout(model)
    layers = {}
    for l, st in saved.layers.items():
        device = mlp_out_device(model, layout, l)  # not the meta device of an offloaded weight
        layers[l] = LayerState(st.delta.to(device, torch.float32), st.alpha,
                               st.span.to(device) if st.span is not None else None)
    return AppliedEdits(model, layers, saved.config)
