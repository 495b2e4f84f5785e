"""An evaluation run's output folder: what it holds when done, and the files that let it resume.

When a run is done the folder holds ``records.jsonl`` (per record, pre and
post), ``summary.json``, ``checkpoints.csv``, ``metrics.png`` and
``run.json`` (the configuration, which names the run). While it runs it also
holds ``pre.json`` (the unedited model's evaluation), ``progress.json`` and,
for a consecutive run, the editor state at its last checkpoint (``state/``
or ``state.safetensors``), so that an interrupted run resumes where it
stopped when it is started again with the same configuration. comeba.evaluate
runs the harness; this module reads and writes the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

from .files import atomic_write_text
from .hparams import HParams
from .methods import REGISTRY
from .reporting import checkpoints_csv, plot_checkpoints
from .requests import Request
from .scoring import DIAGNOSTICS, TEACHER_FORCED, Settings, aggregate

log = logging.getLogger(__name__)

RUN_FILE, PRE_FILE, PROGRESS_FILE = "run.json", "pre.json", "progress.json"
RECORDS_FILE, SUMMARY_FILE, CSV_FILE, PLOT_FILE = "records.jsonl", "summary.json", "checkpoints.csv", "metrics.png"
STATE_DIR, STATE_TENSORS = "state", "state.safetensors"


class EvalError(ValueError):
    """A run that cannot start (bad settings, an output folder holding another run)."""


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str)


def requests_digest(requests: Sequence[Request]) -> str:
    text = json.dumps([r.to_dict() for r in requests], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ============================================================================ the run's configuration


def run_config(method: str, protocol: str, batch_size: int, checkpoint_every: int, requests: Sequence[Request],
               hparams: HParams, model_fp: str, provenance: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """What names a run (run.json): a folder holding another configuration is another run."""
    return {
        "method": method, "protocol": protocol, "batch_size": batch_size, "checkpoint_every": checkpoint_every,
        "n_edits": len(requests), "requests_digest": requests_digest(requests), "hparams": hparams.to_dict(),
        "model_fingerprint": model_fp, "statistics": provenance.get("corpus_id"), "settings": asdict(settings),
    }


FingerprintCheck = Callable[[Any], bool]  # does a recorded fingerprint name the model? (`models.same_model`)


def _same(saved: Mapping[str, Any], current: Mapping[str, Any], known: FingerprintCheck | None) -> bool:
    """Equal, or equal but for a model fingerprint of the first format that `known` recognises."""
    if saved == current:
        return True
    fp = "model_fingerprint"
    return known is not None and {**saved, fp: None} == {**current, fp: None} and known(saved.get(fp))


def prepare_folder(folder: Path, config: Mapping[str, Any], overwrite: bool, known: FingerprintCheck | None = None
                   ) -> str:
    """"new", "resume" or "complete"; refuses a folder that holds another run (a run recorded under the first
    fingerprint format is this run: run.json is rewritten)."""
    if folder.exists() and not folder.is_dir():
        raise EvalError(f"output {str(folder)!r} is a file, not a folder")
    run_file = folder / RUN_FILE
    if folder.is_dir() and overwrite:
        for name in (RUN_FILE, PRE_FILE, PROGRESS_FILE, RECORDS_FILE, SUMMARY_FILE, CSV_FILE, PLOT_FILE, STATE_TENSORS):
            (folder / name).unlink(missing_ok=True)
        shutil.rmtree(folder / STATE_DIR, ignore_errors=True)
    if folder.is_dir() and run_file.is_file():
        saved, current = json.loads(run_file.read_text()), json.loads(to_json(config))
        if not _same(saved, current, known):
            differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise EvalError(
                f"{folder} holds another run (it differs in: {', '.join(differ)}); "
                "give a new --out folder, or --overwrite to replace it"
            )
        if saved != current:  # recorded under the first fingerprint format: from now on under this one
            atomic_write_text(run_file, to_json(config))
        return "complete" if (folder / SUMMARY_FILE).is_file() else "resume"
    if folder.is_dir() and any(folder.iterdir()):
        raise EvalError(f"{folder} is a non-empty folder without a comeba evaluation ({RUN_FILE} missing); "
                        "give a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_file, to_json(config))
    return "new"


def completed_summary(folder: Path) -> dict[str, Any]:
    """The summary of the completed run in `folder`, marked as such."""
    return {**json.loads((folder / SUMMARY_FILE).read_text()), "already_complete": True}


# ============================================================================ the unedited model's evaluation


def pre_key(config: Mapping[str, Any], model_fp: str) -> dict[str, Any]:
    """What the unedited model's evaluation depends on: the records, the settings, the model.

    The diagnostics text does not change the records' pre-edit values: runs with and without it share them.
    """
    settings = {k: v for k, v in config["settings"].items() if k != "diagnostics_text"}
    return {"requests_digest": config["requests_digest"], "settings": settings, "model_fingerprint": model_fp}


def read_pre(path: Path | None, key: Mapping[str, Any], known: FingerprintCheck | None = None) -> dict[str, Any] | None:
    """A saved unedited-model evaluation, if `path` holds one for exactly these records and settings (its "key"
    is `key`'s, or names the model by a first-format fingerprint that `known` recognises), as saved."""
    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("key"), dict):
        return None
    return saved if _same(saved["key"], json.loads(to_json(key)), known) else None


def find_pre(folder: Path | None, pre_cache: str | Path | None, key: Mapping[str, Any],
             known: FingerprintCheck | None = None) -> tuple[dict[str, Any] | None, list[Path]]:
    """The saved evaluation for `key` (the run's pre.json first, then the shared `pre_cache`), and the files
    among those two that lack it (missing, stale, another run's or under an older fingerprint), to be
    (re)written."""
    paths = [p for p in (folder / PRE_FILE if folder else None, Path(pre_cache) if pre_cache is not None else None)
             if p is not None]
    current = json.loads(to_json(key))
    found = [read_pre(p, key, known) for p in paths]
    saved = next((s for s in found if s is not None), None)
    stale = [p for p, s in zip(paths, found) if s is None or s["key"] != current]
    return (None if saved is None else {**saved, "key": current}), stale


def write_pre(paths: Sequence[Path], saved: Mapping[str, Any]) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(saved))


# ============================================================================ progress


class Progress:
    """The mutable part of a run, saved after every unit of work so that a restart resumes."""

    def __init__(self, data: Mapping[str, Any] | None = None):
        d = dict(data or {})
        self.batches_done: int = d.get("batches_done", 0)
        self.checkpoints: list[dict] = d.get("checkpoints", [])
        self.post: list[dict | None] = d.get("post", [])
        self.batch_infos: list[dict] = d.get("batch_infos", [])
        self.seconds: float = d.get("seconds", 0.0)
        self.edit_seconds: float = d.get("edit_seconds", 0.0)
        self.eval_seconds: float = d.get("eval_seconds", 0.0)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def load_progress(folder: Path | None, n_records: int) -> Progress:
    """The progress saved in `folder` (none: a run from the start, no post-edit values yet)."""
    path = folder / PROGRESS_FILE if folder else None
    prog = Progress(json.loads(path.read_text()) if path and path.is_file() else None)
    if prog.batches_done == 0:
        prog.post = [None] * n_records
    return prog


def save_progress(folder: Path, prog: Progress) -> None:
    atomic_write_text(folder / PROGRESS_FILE, to_json(prog.to_dict()))


# ============================================================================ the results


def rounded(d: Mapping[str, float | None]) -> dict[str, float | None]:
    return {k: (None if v is None else round(v, 3)) for k, v in d.items()}


def checkpoint_entry(point: Mapping[str, float | None], n_edits: int, batches: int, seconds: float
                     ) -> dict[str, Any]:
    """One checkpoint (a row of checkpoints.csv): the teacher-forced means and the gate diagnostics."""
    entry: dict[str, Any] = {"n_edits": n_edits, "batches": batches}
    for k in TEACHER_FORCED:
        if k in point:
            entry[k] = None if point[k] is None else round(point[k], 3)
    for k, v in point.items():  # gate diagnostics (already rounded)
        if k.startswith(DIAGNOSTICS):
            entry[k] = v
    entry["seconds"] = round(seconds, 2)
    return entry


def record_entry(i: int, r: Request, batch: int, pre, post, warned: bool = False) -> dict[str, Any]:
    """One line of records.jsonl (`warned`: only where the editor warned the edit would probably not take)."""
    return {
        "index": i,
        "case_id": r.case_id,
        "batch": batch,
        "subject": r.subject,
        "prompt": r.text,
        "target_new": r.target_new.strip(),
        "ground_truth": r.ground_truth,
        "pre": rounded(pre),
        "post": rounded(post or {}),
        **({"warned": True} if warned else {}),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def warned_split(post: Sequence[Mapping[str, Any] | None], warned: Collection[int]) -> dict[str, Any]:
    """summary.json's `warned`: those record indices, and the post means on them and on the other records."""
    marked = [(i in warned, p or {}) for i, p in enumerate(post)]
    return {"records": sorted(warned),
            "post": rounded(aggregate([p for w, p in marked if w])),
            "post_others": rounded(aggregate([p for w, p in marked if not w]))}


def run_summary(config: Mapping[str, Any], n_batches: int, pre: Sequence[Mapping[str, Any]], prog: Progress,
                times: Mapping[str, float], method_info: Mapping[str, Any], provenance: Mapping[str, Any],
                device: str, meta: Mapping[str, Any] | None, warned: Collection[int] = ()) -> dict[str, Any]:
    """summary.json of a run of `config` (run_config): the means before and after, the checkpoints, the times.

    `warned`: the records the editor warned would probably not take (`Editor.edit_warnings`); their final
    means and the others' are given apart, so that a shortfall they cause can be told from one they do not.
    """
    protocol = config["protocol"]
    split = {"warned": warned_split(prog.post, warned)} if warned else {}
    return {
        "method": config["method"],
        "protocol": protocol,
        "n_edits": config["n_edits"],
        "batch_size": config["batch_size"],
        "n_batches": n_batches,
        "checkpoint_every": config["checkpoint_every"],
        "pre": rounded(aggregate(pre)),
        "post": rounded(aggregate(prog.post)),
        "checkpoints": prog.checkpoints,
        "seconds": round(times["seconds"], 2),
        "edit_seconds": round(prog.edit_seconds, 2),
        "eval_seconds": round(prog.eval_seconds, 2),
        "pre_seconds": round(times["pre_seconds"], 2),
        "setup_seconds": round(times["setup_seconds"], 2),
        "seconds_per_edit": round(prog.edit_seconds / config["n_edits"], 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "method_note": REGISTRY[config["method"]].note,
        "method_info": method_info,
        "metric_notes": {
            "units": "percent, except fluency (ROME's weighted 2/3-gram entropy, bits)",
            "locality": "teacher-forced argmax tokens unchanged from the unedited model",
            "checkpoints": ("running means over the records evaluated so far" if protocol == "single"
                            else "all edits so far, teacher-forced metrics"),
            "generation": "exact match of greedy generation (KV cache, as deployed)",
        },
        "hparams": config["hparams"],
        "statistics": provenance,
        "model_fingerprint": config["model_fingerprint"],
        "device": device,
        "batches": prog.batch_infos,
        **split,
        **dict(meta or {}),
    }


def write_outputs(folder: Path, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> None:
    """The finished run's files; then the resume files go (run.json stays: it names the run)."""
    atomic_write_text(folder / RECORDS_FILE, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                                     for r in records))
    atomic_write_text(folder / CSV_FILE, checkpoints_csv(summary["checkpoints"]))
    try:
        plot_checkpoints(summary, folder / PLOT_FILE)
    except ImportError as err:  # matplotlib is optional for the library, not for the CLI
        log.warning("no plot written: %s", err)
    atomic_write_text(folder / SUMMARY_FILE, to_json(summary))
    (folder / PROGRESS_FILE).unlink(missing_ok=True)
    (folder / STATE_TENSORS).unlink(missing_ok=True)
    shutil.rmtree(folder / STATE_DIR, ignore_errors=True)
