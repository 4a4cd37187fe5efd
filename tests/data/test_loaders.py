"""Loaders: real shipped files, hand-written malformed files, every reject reason, errors."""
from __future__ import annotations

import gzip
import json
import re
import sys
import types
from pathlib import Path

import pytest

from sparserm.data import DataError, LoadResult, load_pairs, load_truthfulqa_mc, resolve_format, to_ray_dataset

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HH = DATA / "hh_rlhf_harmless.jsonl.gz"
TQA = DATA / "truthfulqa.csv"
needs_hh = pytest.mark.skipif(not HH.is_file(), reason=f"shipped data {HH} not found (../shared/data beside the checkout)")
needs_tqa = pytest.mark.skipif(not TQA.is_file(), reason=f"shipped data {TQA} not found (../shared/data beside the checkout)")


def dialogue(*turns: str) -> str:
    """turns alternate Human / Assistant."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def j(obj) -> bytes:
    return json.dumps(obj).encode()


def reasons_by_line(result: LoadResult) -> dict[int, str]:
    return {int(r["row_id"].rsplit(":", 1)[1]): r["reason"] for r in result.rejects}


# ---------------------------------------------------------------- real files


@needs_hh
def test_real_hh_counts_and_rejects():
    res = load_pairs(str(HH))
    assert res.format == "hh"
    assert res.n_read == 1505
    assert len(res.rows) + len(res.rejects) == 1505
    assert res.reason_counts() == {"prefix_mismatch": 3, "empty_response": 3}
    assert len(res.rows) == 1499
    by_reason = {}
    for r in res.rejects:
        by_reason.setdefault(r["reason"], set()).add(r["row_id"])
    assert by_reason["prefix_mismatch"] == {f"hh_rlhf_harmless.jsonl.gz:{n}" for n in (826, 1119, 1285)}
    assert by_reason["empty_response"] == {f"hh_rlhf_harmless.jsonl.gz:{n}" for n in (341, 608, 726)}
    for row in res.rows:
        assert set(row) == {"prompt", "chosen", "rejected", "source", "row_id"}
        assert row["prompt"].endswith("\n\nAssistant:") and row["prompt"].startswith("\n\nHuman:")
        assert row["chosen"].strip() and row["rejected"].strip() and row["chosen"] != row["rejected"]
        assert not row["chosen"].startswith(" ")
    # prompt + response rebuilds the original dialogue for the first row
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        first = json.loads(fh.readline())
    row0 = res.rows[0]
    assert row0["row_id"] == "hh_rlhf_harmless.jsonl.gz:0"
    assert first["chosen"] == row0["prompt"] + " " + row0["chosen"]
    assert first["rejected"] == row0["prompt"] + " " + row0["rejected"]


@needs_hh
def test_max_pairs_keeps_first_valid_rows_in_order():
    full = load_pairs(str(HH))
    part = load_pairs(str(HH), max_pairs=400)  # crosses the empty response at line 341
    assert [r["row_id"] for r in part.rows] == [r["row_id"] for r in full.rows[:400]]
    assert part.reason_counts() == {"empty_response": 1}
    assert len(part.rows) + len(part.rejects) == part.n_read == 401
    assert load_pairs(str(HH), max_pairs=0).rows == []


@needs_tqa
def test_real_truthfulqa_pairs_and_mc():
    res = load_pairs(str(TQA))
    assert res.format == "truthfulqa"
    assert len(res.rows) + len(res.rejects) == res.n_read
    assert len(res.rows) == 2804
    # two questions list "Unknown" among both correct and incorrect answers
    assert res.reason_counts() == {"identical_responses": 2}
    assert len({r["prompt"] for r in res.rows}) == 624
    mc = load_truthfulqa_mc(str(TQA))
    assert len(mc) == 624
    assert all(q.correct and q.incorrect and q.best_answer for q in mc)
    assert mc[0].question == "How long should you wait before filing a missing person report?"
    assert mc[0].best_answer in mc[0].correct


# ---------------------------------------------------------------- hand-written HH / JSONL


def test_hh_every_reject_reason(tmp_path):
    lines = [
        j({"chosen": dialogue("hi", "hello"), "rejected": dialogue("hi", "go away")}),  # 0 valid
        b'{"chosen": "oops"',  # 1 invalid_json
        j({"chosen": dialogue("hi", "a"), "rejected": 7}),  # 2 non_text_field
        b'{"chosen": "\xff\xfe", "rejected": "x"}',  # 3 undecodable_bytes
        j({"chosen": dialogue("hi", "a")}),  # 4 missing_field
        j({"chosen": dialogue("hi", ""), "rejected": dialogue("hi", "b")}),  # 5 empty_response
        j({"chosen": dialogue("hi", "same"), "rejected": dialogue("hi", "same")}),  # 6 identical_responses
        j({"chosen": dialogue("hi", "a"), "rejected": dialogue("bye", "b")}),  # 7 prefix_mismatch
        j({"chosen": "\n\nHuman: no answer", "rejected": dialogue("hi", "b")}),  # 8 no_assistant_turn
        b"",  # blank: skipped, not counted
        j([1, 2]),  # 10 invalid_json (not an object)
        j({"chosen": dialogue("q", "a", "q2", "good"), "rejected": dialogue("q", "a", "q2", "  bad")}),  # 11 valid
    ]
    path = write_lines(tmp_path / "pairs.jsonl", lines)
    res = load_pairs(str(path))
    assert res.format == "hh"
    assert res.n_read == 11
    assert [r["row_id"] for r in res.rows] == ["pairs.jsonl:0", "pairs.jsonl:11"]
    assert reasons_by_line(res) == {
        1: "invalid_json", 2: "non_text_field", 3: "undecodable_bytes", 4: "missing_field",
        5: "empty_response", 6: "identical_responses", 7: "prefix_mismatch", 8: "no_assistant_turn",
        10: "invalid_json",
    }
    assert all(r["source"] == "pairs.jsonl" and r["detail"] for r in res.rejects)
    last = res.rows[1]
    assert last["prompt"] == "\n\nHuman: q\n\nAssistant: a\n\nHuman: q2\n\nAssistant:"
    assert (last["chosen"], last["rejected"]) == ("good", "bad")


def test_jsonl_prompt_format_and_gzip(tmp_path):
    lines = [
        j({"prompt": "P0", "chosen": "yes", "rejected": "no"}),  # 0 valid
        j({"prompt": "P1", "chosen": "yes"}),  # 1 missing_field
        j({"prompt": "P2", "chosen": ["yes"], "rejected": "no"}),  # 2 non_text_field
        j({"prompt": "P3", "chosen": None, "rejected": "no"}),  # 3 missing_field (null)
        j({"prompt": " ", "chosen": "yes", "rejected": "no"}),  # 4 empty_prompt
        j({"prompt": "P5", "chosen": "   ", "rejected": "no"}),  # 5 empty_response
        j({"prompt": "P6", "chosen": "same", "rejected": "same"}),  # 6 identical_responses
        b"not json",  # 7 invalid_json
        b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}',  # 8 undecodable_bytes
        j({"prompt": "P9", "chosen": " keep spaces ", "rejected": "no", "extra": 1}),  # 9 valid
    ]
    raw = b"\n".join(lines) + b"\n"
    plain = tmp_path / "p.jsonl"
    plain.write_bytes(raw)
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(raw))
    bom = tmp_path / "bom.jsonl"  # a byte-order mark before the first record (it was rejected as invalid_json)
    bom.write_bytes(b"\xef\xbb\xbf" + raw)
    for path in (plain, gz, bom):
        res = load_pairs(str(path))
        assert res.format == "jsonl"
        assert res.n_read == 10 and len(res.rows) == 2
        assert reasons_by_line(res) == {1: "missing_field", 2: "non_text_field", 3: "missing_field",
                                        4: "empty_prompt", 5: "empty_response", 6: "identical_responses",
                                        7: "invalid_json", 8: "undecodable_bytes"}
        assert res.rows[1] == {"prompt": "P9", "chosen": " keep spaces ", "rejected": "no",
                               "source": path.name, "row_id": f"{path.name}:9"}


def test_explicit_format_overrides_detection(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [j({"chosen": dialogue("a", "b"), "rejected": dialogue("a", "c")})])
    assert len(load_pairs(str(path), "hh").rows) == 1
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert resolve_format(str(path)) == "hh"  # detected past a byte-order mark too
    res = load_pairs(str(path), "jsonl")  # no prompt field -> every row rejected, no crash
    assert res.rows == [] and res.reason_counts() == {"missing_field": 1}


# ---------------------------------------------------------------- TruthfulQA


def test_truthfulqa_pairing_small_csv(tmp_path):
    import csv

    path = tmp_path / "tqa.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as fh:  # with a byte-order mark, as Excel saves it
        w = csv.writer(fh)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        w.writerow(["A", "C", "Q1?", "c1", "c1; c2", "i1; i2; i3", "s"])  # 3 pairs
        w.writerow(["A", "C", "Q2?", "d1", "d1; d1; ", "j1", "s"])  # duplicates/empties dropped: 1 pair
        w.writerow(["A", "C", "Q3?", "e1", "e1", "", "s"])  # no_incorrect_answer
        w.writerow(["A", "C", "Q4?", "", "", "k1", "s"])  # no_correct_answer
    res = load_pairs(str(path))
    assert res.format == "truthfulqa"
    assert [(r["prompt"], r["chosen"], r["rejected"], r["row_id"]) for r in res.rows] == [
        ("Q1?", "c1", "i1", "tqa.csv:0:0"),
        ("Q1?", "c2", "i2", "tqa.csv:0:1"),
        ("Q1?", "c1", "i3", "tqa.csv:0:2"),
        ("Q2?", "d1", "j1", "tqa.csv:1:0"),
    ]
    assert reasons_by_line(res) == {2: "no_incorrect_answer", 3: "no_correct_answer"}
    assert res.n_read == 6
    assert len(load_pairs(str(path), max_pairs=2).rows) == 2
    # per-prompt cap first, then max_pairs: more questions covered by a capped sample
    capped = load_pairs(str(path), max_per_prompt=1)
    assert [r["row_id"] for r in capped.rows] == ["tqa.csv:0:0", "tqa.csv:1:0"]
    assert [r["row_id"] for r in load_pairs(str(path), max_pairs=2, max_per_prompt=2).rows] == ["tqa.csv:0:0", "tqa.csv:0:1"]
    assert capped.reason_counts() == res.reason_counts()  # rows left out by the cap are not rejects
    with pytest.raises(ValueError, match="max_per_prompt"):
        load_pairs(str(path), max_per_prompt=-1)
    mc = load_truthfulqa_mc(str(path))
    assert [(q.question, q.best_answer, q.correct, q.incorrect) for q in mc] == [
        ("Q1?", "c1", ["c1", "c2"], ["i1", "i2", "i3"]),
        ("Q2?", "d1", ["d1"], ["j1"]),
    ]


def test_truthfulqa_missing_columns_is_data_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="bad.csv.*Question"):
        load_pairs(str(path))


# ---------------------------------------------------------------- Parquet


def test_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "prompt": ["p0", "p1", "p2", None],
        "chosen": ["good", "same", "", "x"],
        "rejected": ["bad", "same", "no", "y"],
    })
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    res = load_pairs(str(path))
    assert res.format == "parquet" and res.n_read == 4
    assert res.rows == [{"prompt": "p0", "chosen": "good", "rejected": "bad",
                         "source": "pairs.parquet", "row_id": "pairs.parquet:0"}]
    assert reasons_by_line(res) == {1: "identical_responses", 2: "empty_response", 3: "missing_field"}

    hh = tmp_path / "hh.parquet"  # HH dialogues without a prompt column
    pq.write_table(pa.table({"chosen": [dialogue("q", "a")], "rejected": [dialogue("q", "b")]}), hh)
    assert [(r["prompt"], r["chosen"]) for r in load_pairs(str(hh)).rows] == [("\n\nHuman: q\n\nAssistant:", "a")]

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet"):
        load_pairs(str(broken))


# ---------------------------------------------------------------- errors and format resolution


def test_missing_path_and_unknown_format(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl"):
        load_pairs(str(missing))
    with pytest.raises(DataError, match="nope.jsonl"):
        load_pairs(str(missing), "hh")
    real = write_lines(tmp_path / "ok.jsonl", [j({"prompt": "p", "chosen": "a", "rejected": "b"})])
    with pytest.raises(DataError, match=r"'xml'.*ok\.jsonl"):
        load_pairs(str(real), "xml")
    odd = tmp_path / "data.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match="data.txt"):
        load_pairs(str(odd))
    with pytest.raises(DataError, match="directory"):
        load_pairs(str(tmp_path))
    bad_gz = tmp_path / "bad.jsonl.gz"
    bad_gz.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="bad.jsonl.gz"):
        load_pairs(str(bad_gz), "hh")


def test_resolve_format(tmp_path, monkeypatch):
    assert resolve_format("someone/some-dataset") == "hub"
    assert resolve_format("anything", "hub") == "hub"
    monkeypatch.chdir(tmp_path)  # a relative path names the folder it was read from (a Ray job's is not the user's)
    with pytest.raises(DataError, match=f"does not exist \\(a relative path is read from the working directory, "
                                        f"{re.escape(str(tmp_path))}: in a Ray job"):
        resolve_format("../nowhere/file.jsonl.gz")
    with pytest.raises(DataError, match=r"/nowhere/file.csv does not exist$"):
        resolve_format("/nowhere/file.csv")
    (tmp_path / "a.csv").write_text("Question\n")
    assert resolve_format(str(tmp_path / "a.csv")) == "truthfulqa"


def test_hub_failure_is_data_error_naming_id(monkeypatch):
    def boom(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=boom))
    with pytest.raises(DataError, match="someone/missing-set.*ConnectionError"):
        load_pairs("someone/missing-set")


def test_hub_rows_mapped(monkeypatch):
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "a"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    res = load_pairs("org/prefs", split="test")
    assert calls == [("org/prefs", "test")]
    assert res.format == "hub"
    assert [r["row_id"] for r in res.rows] == ["org/prefs:test:0"]
    assert res.reason_counts() == {"identical_responses": 1}


# ---------------------------------------------------------------- Ray


def test_to_ray_dataset_round_trip():
    ray = pytest.importorskip("ray")
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b", "source": "s", "row_id": f"s:{i}"} for i in range(5)]
    started = not ray.is_initialized()  # another test module may already hold a Ray session
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ds = to_ray_dataset(rows)
        assert ds.count() == 5
        assert sorted(ds.take_all(), key=lambda r: r["row_id"]) == rows
    finally:
        if started:
            ray.shutdown()
