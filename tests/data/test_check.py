"""data check: the JSON summary and rejects.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparserm.data import DataError, check, write_rejects

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HH = DATA / "hh_rlhf_harmless.jsonl.gz"


@pytest.mark.skipif(not HH.is_file(), reason=f"shipped data {HH} not found (../shared/data beside the checkout)")
def test_check_real_hh(tmp_path):
    summary = check(str(HH), out_dir=tmp_path / "out")
    json.dumps(summary)  # JSON-ready
    assert summary == {
        "path": str(HH), "format": "hh", "n_read": 1505, "n_pairs": 1499, "n_rejected": 6,
        "rejects_path": str(tmp_path / "out" / "rejects.jsonl"),
        "reasons": {"empty_response": 3, "prefix_mismatch": 3},
    }
    lines = Path(summary["rejects_path"]).read_text().splitlines()
    assert len(lines) == summary["n_rejected"]
    recs = [json.loads(line) for line in lines]
    assert {r["reason"] for r in recs} == {"empty_response", "prefix_mismatch"}
    assert all(set(r) == {"row_id", "source", "reason", "detail"} for r in recs)


def test_check_default_out_dir_and_clean_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\nnot json\n")
    summary = check(str(path))
    rejects = Path(summary["rejects_path"])
    assert rejects.parent.parent == Path("runs") and rejects.parent.name.startswith("data-check-")
    assert (summary["n_read"], summary["n_pairs"], summary["n_rejected"]) == (2, 1, 1)
    assert summary["reasons"] == {"invalid_json": 1}
    assert json.loads(rejects.read_text())["row_id"] == "ok.jsonl:1"


def test_check_missing_file_raises(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl"):
        check(str(tmp_path / "missing.jsonl"), out_dir=tmp_path)


def test_write_rejects_empty_and_nested(tmp_path):
    p = write_rejects([], tmp_path / "a" / "b" / "rejects.jsonl")
    assert p.is_file() and p.read_text() == ""
    rej = [{"row_id": "f:1", "source": "f", "reason": "invalid_json", "detail": "ünïcode"}]
    assert json.loads(write_rejects(rej, tmp_path / "r.jsonl").read_text()) == rej[0]
