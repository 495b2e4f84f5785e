"""`comeba eval` on several processes: torchrun, gloo, two ranks on the CPU.

Every rank makes the same edits and evaluates its share of the records; rank 0
gathers them and alone writes the run folder. The result is one process's, to
float tolerance (the records are batched differently).
"""

from __future__ import annotations

import json

import pytest

from test_distributed_stats import _setup, _torchrun
from test_evaluate import REQUESTS

HPARAMS = "layers: [1, 2]\nv_num_grad_steps: 10\nmom2_n_tokens: 1500\ncontext_template_prefixes: [The]\n" \
          "context_template_length: 6\nmom2_update_weight: 100.0\nclamp_norm_factor: 10.0\n"


@pytest.mark.parametrize("method", ["comeba", "seq-memit"])
def test_torchrun_eval_equals_one_process(tmp_path, make_tiny, tokenizer, corpus_file, one_thread, monkeypatch,
                                          capsys, method):
    from comeba.cli import main

    model_dir, corpus = _setup(tmp_path, make_tiny, tokenizer, corpus_file)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([dict(r, case_id=i) for i, r in enumerate(REQUESTS + REQUESTS[:1])]))
    hp = tmp_path / "hp.yaml"
    hp.write_text(HPARAMS)

    def args(out):  # 5 records: the ranks get 3 and 2
        return ["eval", "--method", method, "--data", f"counterfact:{data}", "--batch-size", "2",
                "--checkpoint-every", "1", "--stats-text", str(corpus), "--hparams", str(hp), "--model",
                str(model_dir), "--fluency-tokens", "3", "--device", "cpu", "--out", str(out)]

    done = _torchrun(["-m", "comeba", *args(tmp_path / "two"), "--quiet"], tmp_path / "home", timeout=300)
    assert done.stdout.count("wrote ") == 1, done.stdout  # rank 0 speaks for both
    monkeypatch.setenv("COMEBA_HOME", str(tmp_path / "home"))
    assert main([*args(tmp_path / "one"), "--quiet"]) == 0
    capsys.readouterr()

    two, one = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("two", "one"))
    assert two["n_edits"] == one["n_edits"] == 5 and (two["processes"], one["processes"]) == (2, 1)
    for part in ("pre", "post"):
        assert two[part].keys() == one[part].keys()
        for key, value in one[part].items():
            assert two[part][key] == pytest.approx(value, abs=1e-3), (part, key)
    assert len(two["checkpoints"]) == len(one["checkpoints"]) == 3
    for a, b in zip(two["checkpoints"], one["checkpoints"]):
        for key in ("reliability", "generality", "locality"):
            assert a[key] == pytest.approx(b[key], abs=1e-3), key
    rec_two, rec_one = ([json.loads(line) for line in (tmp_path / d / "records.jsonl").read_text().splitlines()]
                        for d in ("two", "one"))
    assert [r["case_id"] for r in rec_two] == [r["case_id"] for r in rec_one] == [0, 1, 2, 3, 4]
    assert two["method_info"] == one["method_info"]
