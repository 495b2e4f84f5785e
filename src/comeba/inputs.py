"""What a user gives the command line, read and checked before any model is loaded.

Edit-request files, data sets, hyperparameter files, statistics texts and
state folders. Every problem is an `InputError` with a one-line message that
names the file. Imports nothing heavy at module level (torch only where a
function needs it), so that `comeba --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")


class InputError(Exception):
    """A user error in a file, folder or option: reported as one line, exit status 2."""


def read_file(path: str, what: str, read: Callable[[Path], T]) -> T:
    """`read(path)`; a missing file, non-UTF-8 text, bad JSON or a bad layout is an InputError naming `what`."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{what} {path!r} does not exist" if not file.exists() else f"{what} {path!r} is not a file")
    try:
        return read(file)
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path!r} is not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{what} {path!r} is not valid JSON: {err}") from None
    except ValueError as err:
        raise InputError(f"{what} {path!r}: {err}") from None


def read_requests(path: str) -> list:
    """Every record of FILE validated as an edit request; the first bad one is an error."""
    from .data import easyedit_record, read_records
    from .requests import RequestError, make_request

    records = read_file(path, "edits file", read_records)
    if not records:
        raise InputError(f"edits file {path!r} holds no edit requests")
    requests = []
    for index, record in enumerate(records):
        try:
            request = make_request(easyedit_record(record, index), index)
        except RequestError as err:
            message = str(err)
            if isinstance(record, dict) and not {"prompt", "subject", "target_new"} & set(record):
                keys = ", ".join(repr(k) for k in list(record)[:5]) or "none"
                message = (f"request {index} is not an edit request (its keys: {keys}); an edits file is a JSON list "
                           "of requests, or one request per line (JSON Lines)")
            if not message.startswith("request "):
                message = f"request {index}: {message}"
            raise InputError(f"{path}: {message}") from None
        except (TypeError, KeyError, AttributeError) as err:
            raise InputError(f"{path}: request {index}: {err}") from None
        if any(not t.strip() for t in request.locality_ground_truths):
            raise InputError(f"{path}: request {index}: empty locality_ground_truth")
        requests.append(request)
    return requests


def read_dataset(spec: str, offset: int = 0, n: int | None = None):
    """(kind, LoadResult) of a --data spec (counterfact:PATH, zsre:PATH, easyedit:PATH or PATH).

    Records that cannot be edited are skipped (LoadResult.skipped); none left is an error.
    """
    from .data import load_dataset_spec, split_dataset_spec

    kind, path = split_dataset_spec(spec)
    loaded = read_file(path, "data file", lambda _: load_dataset_spec(spec, offset=offset, n=n))
    if not loaded.requests:
        why = (f" (skipped {len(loaded.skipped)}; first: record {loaded.skipped[0][0]}: {loaded.skipped[0][1]})"
               if loaded.skipped else "")
        raise InputError(f"{spec}: no usable records from offset {offset}"
                         + (f" in the next {n}" if n else "") + why)
    return kind, loaded


def read_hparams(path: str | None, **overrides: Any):
    """The hyperparameters of a YAML file (defaults without one), with the options given (not None) on top."""
    from .hparams import HParams

    hp = HParams.from_yaml(path) if path else HParams()
    changes = {k: v for k, v in overrides.items() if v is not None}
    return hp.replace(**changes) if changes else hp


def check_stats_text(paths: Sequence[str] | None) -> None:
    """Fail early on a missing statistics text (before a model is loaded)."""
    for p in paths or ():
        if not Path(p).exists():
            raise InputError(f"statistics text {p!r} does not exist")


def resolve_corpus(stats_text: Sequence[str] | None, hp) -> Any:
    """--stats-text wins; else the hparams' mom2_dataset ("auto", "samples", a local path or a HF spec)."""
    from .corpus import corpus_from_spec, text_corpus

    if stats_text:
        return text_corpus(stats_text)
    return corpus_from_spec(str(getattr(hp, "mom2_dataset", "auto") or "auto"), hp.seed)


def state_kind(directory: str | None) -> str:
    """"none" (no --state), "new" (absent or empty folder) or "existing" (holds a state)."""
    from .adapter import ADAPTER_CONFIG, LEGACY_CONFIG

    if directory is None:
        return "none"
    path = Path(directory)
    if not path.exists():
        return "new"
    if not path.is_dir():
        raise InputError(f"--state {directory!r} is a file, not a folder")
    if (path / ADAPTER_CONFIG).exists() or (path / LEGACY_CONFIG).exists():
        return "existing"
    if any(path.iterdir()):
        raise InputError(
            f"--state {directory!r} is a non-empty folder without a comeba state ({ADAPTER_CONFIG} missing); "
            "give a new or empty folder, or a folder written by `comeba edit`"
        )
    return "new"


def base_model_of(directory: str) -> str:
    """The base model recorded in a saved state (its name_or_path)."""
    from .adapter import read_config

    config = read_config(directory)
    name = str((config.get("base_model") or {}).get("name_or_path") or "")
    if not name:
        raise InputError(f"the state in {directory!r} does not record its base model; pass --model")
    return name
