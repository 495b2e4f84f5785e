"""Edit requests: EasyEdit-shaped dicts checked and normalised once, up front.

Every request is validated before the editor touches its state, so bad input
fails with a message that names the record and the problem and leaves the
editor as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence


class RequestError(ValueError):
    """An edit request that cannot be written (names the record and the problem)."""


@dataclass(frozen=True)
class Request:
    """One fact to write.

    `prompt` is a template holding the subject as ``{}`` exactly once;
    `target_new` always starts with a space (the convention of MEMIT/EasyEdit,
    so that the target is tokenised as a continuation of the prompt).
    """

    prompt: str
    subject: str
    target_new: str
    ground_truth: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()
    locality_ground_truths: tuple[str, ...] = ()
    case_id: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def text(self) -> str:
        """The bare prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        """EasyEdit-shaped dict (subject filled into the prompt)."""
        out: dict[str, Any] = {
            "prompt": self.text,
            "subject": self.subject,
            "target_new": self.target_new.strip(),
        }
        if self.ground_truth is not None:
            out["ground_truth"] = self.ground_truth.strip()
        if self.rephrase_prompts:
            out["rephrase_prompt"] = list(self.rephrase_prompts)
        if self.locality_prompts:
            out["locality_prompt"] = list(self.locality_prompts)
            out["locality_ground_truth"] = list(self.locality_ground_truths)
        if self.case_id is not None:
            out["case_id"] = self.case_id
        return out


def _as_str(value: Any) -> str | None:
    """EasyEdit sometimes wraps strings as {"str": ...}; accept both."""
    if value is None:
        return None
    if isinstance(value, Mapping) and "str" in value:
        value = value["str"]
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _as_str_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, Mapping)):
        return (_as_str(value),)  # type: ignore[return-value]
    return tuple(_as_str(v) for v in value)  # type: ignore[misc]


def make_template(prompt: str, subject: str) -> str:
    """Replace the subject in `prompt` by ``{}``; the subject must occur exactly once."""
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise RequestError(f"prompt {prompt!r} holds '{{}}' more than once")
        # The subject's place is given; any other brace is literal text.
        before, after = prompt.split("{}")
        return _escape(before) + "{}" + _escape(after)
    count = prompt.count(subject)
    if count == 0:
        raise RequestError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    if count > 1:
        raise RequestError(
            f"subject {subject!r} occurs {count} times in prompt {prompt!r}; "
            "the key position would be ambiguous"
        )
    # Literal braces elsewhere in the prompt would break str.format.
    return _escape(prompt).replace(_escape(subject), "{}", 1)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def make_request(record: Mapping[str, Any], index: int | None = None) -> Request:
    """Validate one EasyEdit-shaped dict and return a `Request`."""
    where = f"request {index}" if index is not None else "request"
    if not isinstance(record, Mapping):
        raise RequestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        for key in ("prompt", "subject", "target_new"):
            if key not in record:
                raise RequestError(f"{where}: missing required field {key!r}")
        prompt = _as_str(record["prompt"])
        subject = _as_str(record["subject"])
        target = _as_str(record["target_new"])
        assert prompt is not None and subject is not None and target is not None
        if not subject.strip():
            raise RequestError(f"{where}: empty subject")
        if not target.strip():
            raise RequestError(f"{where}: empty target_new")
        template = make_template(prompt, subject)
        loc_prompts = _as_str_tuple(record.get("locality_prompt"))
        loc_truths = _as_str_tuple(record.get("locality_ground_truth"))
        if loc_truths and len(loc_truths) != len(loc_prompts):
            raise RequestError(
                f"{where}: {len(loc_prompts)} locality prompts but "
                f"{len(loc_truths)} locality ground truths"
            )
        known = {
            "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
            "locality_prompt", "locality_ground_truth", "case_id",
        }
        return Request(
            prompt=template,
            subject=subject,
            target_new=" " + target.strip(),
            ground_truth=_as_str(record.get("ground_truth")),
            rephrase_prompts=_as_str_tuple(record.get("rephrase_prompt")),
            locality_prompts=loc_prompts,
            locality_ground_truths=loc_truths,
            case_id=record.get("case_id"),
            extra={k: v for k, v in record.items() if k not in known},
        )
    except RequestError as err:
        if str(err).startswith(where):
            raise
        raise RequestError(f"{where}: {err}") from None
    except TypeError as err:
        raise RequestError(f"{where}: {err}") from None


def _edited_prompt(r: Request) -> tuple[str, str]:
    """What two requests share when they edit the same prompt (and may then not give it two targets at once)."""
    return r.prompt, r.subject


def make_requests(records: Iterable[Mapping[str, Any] | Request], one_batch: bool = True) -> list[Request]:
    """Validate requests; raises on the first bad record, before any work.

    `one_batch`: they are written as one batch, which must not give one prompt
    two targets. Requests for consecutive batches (`one_batch=False`) may: a
    later batch replaces an earlier edit, and `consecutive_batches` keeps the
    two apart.
    """
    out = [r if isinstance(r, Request) else make_request(r, i) for i, r in enumerate(records)]
    if not out:
        raise RequestError("no edit requests given")
    if not one_batch:
        return out
    first: dict[tuple[str, str], int] = {}
    for i, r in enumerate(out):
        j = first.setdefault(_edited_prompt(r), i)
        if j != i and out[j].target_new != r.target_new:
            raise RequestError(f"requests {j} and {i} give the prompt {r.text!r} two targets "
                               f"({out[j].target_new.strip()!r} and {r.target_new.strip()!r}): one batch must not "
                               "contradict itself")
    return out


def consecutive_batches(requests: Sequence[Request], size: int) -> list[tuple[int, int]]:
    """Consecutive batches (lo, hi) of at most `size` requests, in order.

    A request that would give a prompt already in its batch a second target
    starts the next batch instead, so the later edit replaces the earlier one
    as consecutive editing means (CounterFact repeats some prompts with other
    targets: 59 of counterfact-scale.json's prompts have two or three).
    """
    if size < 1:
        raise ValueError(f"batch size must be positive, got {size}")
    out: list[tuple[int, int]] = []
    lo, targets = 0, {}
    for i, r in enumerate(requests):
        key = _edited_prompt(r)
        if i - lo == size or targets.get(key, r.target_new) != r.target_new:
            out.append((lo, i))
            lo, targets = i, {}
        targets.setdefault(key, r.target_new)
    if lo < len(requests):
        out.append((lo, len(requests)))
    return out
