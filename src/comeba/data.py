"""Benchmark data sets (CounterFact, zsRE, EasyEdit-shaped files) as edit requests.

Every layout is mapped onto the EasyEdit dict shape and validated by
`comeba.requests.make_request`, so the editor and the evaluation see one kind
of record. Records that cannot be written (subject not in the prompt, empty
target, missing fields) are reported and skipped, never silently dropped: the
loaders return them as ``(index, reason)`` pairs, where index is the record's
position in the file, and log a warning for each.

Layouts:

- CounterFact, flat (EasyEdit's ``counterfact-edit.json``): ``case_id, prompt,
  subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
  locality_ground_truth``. This is already the EasyEdit shape.
- CounterFact, ROME's ``counterfact.json``: ``requested_rewrite`` holds the
  prompt template (with ``{}``), subject, ``target_new.str`` and
  ``target_true.str``; ``paraphrase_prompts`` become the rephrase prompts and
  ``neighborhood_prompts`` the locality prompts, whose ground truth is
  ``target_true`` (the neighbours share the relation and the true object).
- zsRE, MEND's layout: ``subject, src, pred, rephrase, alt, answers, loc,
  loc_ans``. target_new = ``alt``; ground_truth = ``answers[0]`` (``pred`` when
  there are no answers), as EasyEdit's ``ZsreDataset``. The locality prompt
  is ``loc`` *as is*, including its ``"nq question: "`` prefix: EasyEdit's
  ``ZsreDataset`` and its zsRE examples pass ``loc`` unchanged, so locality
  numbers stay comparable with published ones.
- plain JSON lists or JSONL files of EasyEdit-shaped dicts; each record's
  layout is detected (ROME and zsRE records are recognised by their keys).

A slice ``offset, n`` selects records by their position in the file (records
``offset .. offset+n-1``), before validation, so "records 0-19" always means
the same records; skipped ones in the slice are reported, not replaced.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from comeba.requests import Request, RequestError, make_request

log = logging.getLogger(__name__)

__all__ = [
    "LoadResult",
    "read_records",
    "counterfact_record",
    "zsre_record",
    "easyedit_record",
    "requests_from_records",
    "load_counterfact",
    "load_zsre",
    "load_easyedit",
    "split_dataset_spec",
    "load_dataset_spec",
    "DATASET_KINDS",
]


class LoadResult(NamedTuple):
    """Valid requests and the records that were skipped, as (file index, reason)."""

    requests: list[Request]
    skipped: list[tuple[int, str]]


# --------------------------------------------------------------------- reading


def read_records(path: str | Path) -> list[Any]:
    """Raw records of a JSON list, a JSON object with a ``data`` list, or a JSONL file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":
        data = json.loads(text)
    elif stripped[0] == "{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = _read_jsonl(text, path)
        else:
            # One JSON object: either a wrapper holding the list, or a one-line JSONL.
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            else:
                data = [data]
    else:
        raise ValueError(f"{path}: not a JSON list or JSONL file")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def _read_jsonl(text: str, path: Path) -> list[Any]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON line ({err.msg})") from None
    return out


# ------------------------------------------------------------- layout mapping


def _require(record: Mapping[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise RequestError(f"missing field(s) {', '.join(map(repr, missing))}")


def _rome_record(record: Mapping[str, Any], index: int) -> dict[str, Any]:
    rw = record["requested_rewrite"]
    if not isinstance(rw, Mapping):
        raise RequestError("'requested_rewrite' is not an object")
    _require(rw, "prompt", "subject", "target_new")
    true = rw.get("target_true")
    true_str = true.get("str") if isinstance(true, Mapping) else true
    neighbours = list(record.get("neighborhood_prompts") or [])
    out: dict[str, Any] = {
        "case_id": record.get("case_id", index),
        "prompt": rw["prompt"],
        "subject": rw["subject"],
        "target_new": rw["target_new"],
        "ground_truth": true_str,
        "rephrase_prompt": list(record.get("paraphrase_prompts") or []),
        "locality_prompt": neighbours,
    }
    if neighbours:
        if not isinstance(true_str, str) or not true_str.strip():
            raise RequestError("neighborhood prompts but no target_true to score them against")
        out["locality_ground_truth"] = [true_str] * len(neighbours)
    for key in ("relation_id",):
        if key in rw:
            out[key] = rw[key]
    for key in ("attribute_prompts", "generation_prompts"):
        if key in record:
            out[key] = record[key]
    return out


def counterfact_record(record: Any, index: int) -> dict[str, Any]:
    """A CounterFact record (flat or ROME layout) as an EasyEdit-shaped dict."""
    if not isinstance(record, Mapping):
        raise RequestError(f"expected a JSON object, got {type(record).__name__}")
    if "requested_rewrite" in record:
        return _rome_record(record, index)
    _require(record, "prompt", "subject", "target_new")
    out = dict(record)
    out.setdefault("case_id", index)
    return out


def zsre_record(record: Any, index: int) -> dict[str, Any]:
    """A zsRE (MEND layout) record as an EasyEdit-shaped dict, as EasyEdit's ZsreDataset maps it."""
    if not isinstance(record, Mapping):
        raise RequestError(f"expected a JSON object, got {type(record).__name__}")
    _require(record, "subject", "src", "alt")
    answers = record.get("answers") or []
    truth = answers[0] if answers else record.get("pred")
    out: dict[str, Any] = {
        "case_id": record.get("case_id", index),
        "prompt": record["src"],
        "subject": record["subject"],
        "target_new": record["alt"],
        "ground_truth": truth,
        "rephrase_prompt": record.get("rephrase"),
    }
    if record.get("loc") is not None:
        # Kept with its "nq question: " prefix, as EasyEdit does.
        out["locality_prompt"] = record["loc"]
        out["locality_ground_truth"] = record.get("loc_ans")
    for key in ("pred", "answers", "cond"):
        if key in record:
            out[key] = record[key]
    return out


def easyedit_record(record: Any, index: int) -> dict[str, Any]:
    """Any supported record, its layout detected from its keys."""
    if isinstance(record, Mapping):
        if "requested_rewrite" in record:
            return _rome_record(record, index)
        if "src" in record and "alt" in record and "prompt" not in record:
            return zsre_record(record, index)
    return counterfact_record(record, index)


# ---------------------------------------------------------------- validation


def requests_from_records(
    records: Sequence[Any],
    convert: Callable[[Any, int], Mapping[str, Any]] = easyedit_record,
    *,
    offset: int = 0,
    n: int | None = None,
    source: str = "data",
) -> LoadResult:
    """Convert and validate ``records[offset:offset+n]``, reporting the ones that fail."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    stop = len(records) if n is None else min(len(records), offset + n)
    requests: list[Request] = []
    skipped: list[tuple[int, str]] = []
    for index in range(offset, stop):
        try:
            request = make_request(convert(records[index], index), index)
            if any(not t.strip() for t in request.locality_ground_truths):
                raise RequestError("empty locality_ground_truth (locality cannot be scored)")
            requests.append(request)
        except (RequestError, TypeError, KeyError, AttributeError) as err:
            reason = str(err)
            prefix = f"request {index}: "
            if reason.startswith(prefix):
                reason = reason[len(prefix):]
            skipped.append((index, reason))
            log.warning("%s: skipping record %d: %s", source, index, reason)
    if skipped:
        log.warning(
            "%s: skipped %d of %d records (kept %d)",
            source, len(skipped), stop - min(offset, stop), len(requests),
        )
    return LoadResult(requests, skipped)


def load_counterfact(path: str | Path, offset: int = 0, n: int | None = None) -> LoadResult:
    """CounterFact in the flat (EasyEdit) or ROME layout."""
    return requests_from_records(
        read_records(path), counterfact_record, offset=offset, n=n, source=str(path)
    )


def load_zsre(path: str | Path, offset: int = 0, n: int | None = None) -> LoadResult:
    """zsRE in MEND's layout (``src, alt, answers, rephrase, loc, loc_ans``)."""
    return requests_from_records(
        read_records(path), zsre_record, offset=offset, n=n, source=str(path)
    )


def load_easyedit(path: str | Path, offset: int = 0, n: int | None = None) -> LoadResult:
    """A JSON list / JSONL of EasyEdit-shaped dicts (ROME and zsRE records recognised too)."""
    return requests_from_records(
        read_records(path), easyedit_record, offset=offset, n=n, source=str(path)
    )


DATASET_KINDS: Mapping[str, Callable[..., LoadResult]] = MappingProxyType({
    "counterfact": load_counterfact,
    "zsre": load_zsre,
    "easyedit": load_easyedit,
    "json": load_easyedit,
})


def split_dataset_spec(spec: str) -> tuple[str, str]:
    """(kind, path) of ``"counterfact:PATH"``, ``"zsre:PATH"``, ``"easyedit:PATH"`` or a bare ``"PATH"``.

    A bare path is of kind ``easyedit``. Only the known kinds are taken as
    prefixes, so a path holding a colon (``C:\\data.json``) still works.
    """
    kind, sep, rest = spec.partition(":")
    if sep and kind.lower() in DATASET_KINDS:
        return kind.lower(), rest
    return "easyedit", spec


def load_dataset_spec(spec: str, offset: int = 0, n: int | None = None) -> LoadResult:
    """Load ``"counterfact:PATH"``, ``"zsre:PATH"``, ``"easyedit:PATH"`` or a bare ``"PATH"``.

    A bare path is read as EasyEdit-shaped records with per-record layout
    detection (see `split_dataset_spec`).
    """
    kind, path = split_dataset_spec(spec)
    return DATASET_KINDS[kind](path, offset=offset, n=n)
