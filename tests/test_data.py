"""Benchmark loaders: layouts, slices, and bad records reported rather than dropped."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from comeba.data import (
    LoadResult,
    load_counterfact,
    load_dataset_spec,
    load_easyedit,
    load_zsre,
    read_records,
)
from comeba.requests import Request

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CF_DEV = DATA / "counterfact" / "counterfact-dev.json"
ZSRE_DEV = DATA / "zsre" / "zsre-dev.json"

FLAT = {
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}
ROME = {
    "case_id": 7,
    "pararel_idx": 1,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": [
        "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
        "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language",
    ],
    "neighborhood_prompts": [
        "The mother tongue of Léon Blum is",
        "The native language of Montesquieu is",
    ],
    "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}
BAD_SUBJECT = dict(FLAT, case_id=1, subject="Catherine Deneuve")
EMPTY_TARGET = dict(FLAT, case_id=2, target_new="  ")


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# ------------------------------------------------------------------ layouts


def test_counterfact_flat_and_rome(tmp_path):
    path = _write(tmp_path / "cf.json", [FLAT, ROME])
    res = load_counterfact(path)
    assert isinstance(res, LoadResult) and res.skipped == []
    flat, rome = res.requests
    assert flat == Request(
        prompt="The mother tongue of {} is",
        subject="Danielle Darrieux",
        target_new=" English",
        ground_truth="French",
        rephrase_prompts=("Where Danielle Darrieux is from, people speak the language of",),
        locality_prompts=("Michel Rocard is a native speaker of",),
        locality_ground_truths=("French",),
        case_id=0,
    )
    assert rome.prompt == "The mother tongue of {} is"
    assert rome.subject == "Danielle Darrieux"
    assert rome.target_new == " English" and rome.ground_truth == "French"
    assert rome.rephrase_prompts == tuple(ROME["paraphrase_prompts"])
    # Neighbourhood prompts are scored against the true target.
    assert rome.locality_prompts == tuple(ROME["neighborhood_prompts"])
    assert rome.locality_ground_truths == ("French", "French")
    assert rome.case_id == 7
    assert rome.extra["generation_prompts"] == ROME["generation_prompts"]
    assert rome.extra["relation_id"] == "P103"
    # The bare-path loader recognises both layouts too.
    assert load_dataset_spec(str(path)).requests == res.requests


def test_zsre_layout_keeps_nq_prefix(tmp_path):
    no_answers = dict(ZSRE, answers=[], pred="uniforms")
    path = _write(tmp_path / "zsre.json", [ZSRE, no_answers])
    res = load_zsre(path)
    assert res.skipped == []
    req, req2 = res.requests
    assert req.prompt == "What is the product made by {}?"
    assert req.target_new == " unmanned aircraft"
    assert req.ground_truth == "uniform"
    assert req.rephrase_prompts == ("What will be the product of UniFirst?",)
    assert req.locality_prompts == ("nq question: john goodman's character in the big lebowski",)
    assert req.locality_ground_truths == ("Walter Sobchak",)
    assert req.case_id == 0
    assert req2.ground_truth == "uniforms" and req2.case_id == 1
    # Detected without the prefix as well.
    assert load_dataset_spec(str(path)).requests == res.requests


def test_bad_records_are_reported(tmp_path, caplog):
    path = _write(tmp_path / "mixed.json", [FLAT, BAD_SUBJECT, EMPTY_TARGET, ROME, "junk"])
    with caplog.at_level(logging.WARNING, logger="comeba.data"):
        res = load_counterfact(path)
    assert [r.case_id for r in res.requests] == [0, 7]
    assert [i for i, _ in res.skipped] == [1, 2, 4]
    reasons = dict(res.skipped)
    assert "does not occur" in reasons[1] and "Catherine Deneuve" in reasons[1]
    assert "empty target_new" in reasons[2]
    assert "JSON object" in reasons[4]
    # Every skipped record is in the log, plus a summary.
    text = caplog.text
    assert "skipping record 1" in text and "skipping record 2" in text and "skipping record 4" in text
    assert "skipped 3 of 5" in text


def test_missing_fields_and_empty_locality_truth_are_reported(tmp_path):
    recs = [
        {k: v for k, v in ZSRE.items() if k != "alt"},
        dict(ZSRE, alt=""),
        dict(ZSRE, loc_ans=" "),
        dict(ZSRE, subject="Unifirst"),  # case differs: not in the prompt
        ZSRE,
    ]
    res = load_zsre(_write(tmp_path / "z.json", recs))
    assert len(res.requests) == 1 and res.requests[0].case_id == 4
    reasons = dict(res.skipped)
    assert sorted(reasons) == [0, 1, 2, 3]
    assert "'alt'" in reasons[0]
    assert "empty target_new" in reasons[1]
    assert "locality_ground_truth" in reasons[2]
    assert "does not occur" in reasons[3]


def test_subject_twice_is_reported(tmp_path):
    rec = dict(FLAT, prompt="Danielle Darrieux, yes Danielle Darrieux, speaks")
    res = load_easyedit(_write(tmp_path / "t.json", [rec]))
    assert res.requests == [] and "2 times" in res.skipped[0][1]


# --------------------------------------------------------- files and slices


def test_jsonl_and_wrapped_json(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [FLAT, ZSRE, ROME]) + "\n\n", encoding="utf-8")
    res = load_dataset_spec(str(jsonl))
    assert [r.subject for r in res.requests] == ["Danielle Darrieux", "UniFirst", "Danielle Darrieux"]
    wrapped = _write(tmp_path / "w.json", {"data": [FLAT]})
    assert len(read_records(wrapped)) == 1
    single = _write(tmp_path / "one.json", FLAT)
    assert load_easyedit(single).requests[0].case_id == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(FLAT) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(bad)


def test_slices_follow_file_positions(tmp_path):
    recs = [dict(FLAT, case_id=i) for i in range(6)]
    recs[2] = dict(BAD_SUBJECT, case_id=2)
    path = _write(tmp_path / "cf.json", recs)
    res = load_dataset_spec(f"counterfact:{path}", offset=1, n=3)
    # records 1, 2, 3: record 2 is reported, not replaced by record 4.
    assert [r.case_id for r in res.requests] == [1, 3]
    assert [i for i, _ in res.skipped] == [2]
    assert len(load_dataset_spec(f"counterfact:{path}", offset=4).requests) == 2
    assert load_dataset_spec(f"counterfact:{path}", offset=10).requests == []
    assert load_dataset_spec(f"counterfact:{path}", n=0).requests == []
    with pytest.raises(ValueError):
        load_dataset_spec(str(path), offset=-1)
    with pytest.raises(FileNotFoundError):
        load_dataset_spec(f"zsre:{tmp_path / 'missing.json'}")


# ------------------------------------------------------------- the real files


def test_real_counterfact_dev():
    if not CF_DEV.exists():
        pytest.skip("shared CounterFact data not present")
    res = load_dataset_spec(f"counterfact:{CF_DEV}")
    assert len(res.requests) + len(res.skipped) == 2000
    first = res.requests[0]
    assert first.text == "The mother tongue of Danielle Darrieux is"
    assert first.target_new == " English" and first.ground_truth == "French"
    assert first.locality_ground_truths == ("French",)
    part = load_dataset_spec(f"counterfact:{CF_DEV}", offset=0, n=20)
    assert len(part.requests) + len(part.skipped) == 20
    assert part.requests[:3] == res.requests[:3]
    for r in res.requests:
        assert r.prompt.count("{}") == 1 and r.target_new.startswith(" ")


def test_real_zsre_dev():
    if not ZSRE_DEV.exists():
        pytest.skip("shared zsRE data not present")
    res = load_dataset_spec(f"zsre:{ZSRE_DEV}")
    assert len(res.requests) + len(res.skipped) == 500
    first = res.requests[0]
    assert first.text == "What is the product made by UniFirst?"
    assert first.target_new == " unmanned aircraft" and first.ground_truth == "uniform"
    assert all(r.locality_prompts[0].startswith("nq question: ") for r in res.requests)
    # answers[0] wins over pred where they differ (record 2: pred 1998, answers [1987]).
    by_id = {r.case_id: r for r in res.requests}
    if 2 in by_id:
        assert by_id[2].ground_truth == "1987"


def test_braces_in_prompts_are_literal_text():
    from comeba.requests import make_request

    given = make_request({"prompt": "In {x} and {} {y}", "subject": "Paris", "target_new": "France"})
    assert given.text == "In {x} and Paris {y}"
    found = make_request({"prompt": "In {x} and Paris }{", "subject": "Paris", "target_new": "France"})
    assert found.text == "In {x} and Paris }{"


def test_contradicting_requests_in_one_batch_are_refused():
    from comeba.requests import RequestError, make_requests

    a = {"prompt": "The capital of France is", "subject": "France", "target_new": "Berlin"}
    same = dict(a)
    other = dict(a, target_new="Rome")
    assert len(make_requests([a, same])) == 2  # a repeated request is harmless
    with pytest.raises(RequestError, match="requests 0 and 2 give the prompt 'The capital of France is' two targets"):
        make_requests([a, {"prompt": "x of Spain", "subject": "Spain", "target_new": "y"}, other])


def test_consecutive_batches_keep_a_replaced_edit_out_of_its_own_batch():
    from comeba.requests import consecutive_batches, make_requests

    a = {"prompt": "The capital of France is", "subject": "France", "target_new": "Berlin"}
    reqs = make_requests([a, dict(a, subject="Spain", prompt="The capital of Spain is"), dict(a),
                          dict(a, target_new="Rome"), dict(a, subject="Italy", prompt="The capital of Italy is")],
                         one_batch=False)
    # the repeat of request 0 (same target) stays in its batch; request 3 gives France a second target, so it
    # starts the next batch and, written after it, replaces that edit
    assert consecutive_batches(reqs, 4) == [(0, 3), (3, 5)]
    assert consecutive_batches(reqs, 2) == [(0, 2), (2, 3), (3, 5)]
    assert consecutive_batches(reqs, 1) == [(i, i + 1) for i in range(5)]
    assert consecutive_batches(reqs, 10) == [(0, 3), (3, 5)]
    with pytest.raises(ValueError, match="batch size must be positive"):
        consecutive_batches(reqs, 0)
