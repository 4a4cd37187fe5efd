"""benchmarks/steer_decode.py on the tiny map: both variants run at each batch size, the last line's ratio is the
smaller of the per-batch ratios, and only the steered variant edits tokens."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_steer_decode_reports_both_variants_per_batch(steer_map, capsys):
    spec = importlib.util.spec_from_file_location("steer_decode_bench", ROOT / "benchmarks" / "steer_decode.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    out = mod.main(["--map-dir", str(steer_map), "--batch-sizes", "1,3", "--new-tokens", "4", "--repeats", "1"])
    assert set(out["batches"]) == {"1", "3"}
    ratios = [b["steered_vs_plain"] for b in out["batches"].values()]
    assert out["steered_vs_plain_tokens_per_s"] == min(ratios) and out["pass"] == (min(ratios) >= 0.9)
    for b, r in out["batches"].items():
        assert r["plain_tokens_per_s"] > 0 and r["steered_tokens_per_s"] > 0
        assert 1 <= r["forwards"] <= 4 and len(r["wall_s"]["plain"]) == len(r["wall_s"]["steered"]) == 1
    assert out["batches"]["3"]["edited_tokens_steered"] > 0  # the tiny map edits (see test_generate)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"steered_vs_plain_tokens_per_s"')
