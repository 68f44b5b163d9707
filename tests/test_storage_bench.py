"""Smoke test of the checkpoint benchmark at a tiny size (the real run is 1 GiB, by hand)."""

from __future__ import annotations

import json

from bench.checkpoint import gpt_state, main, parse_size


def test_bench_runs_and_reports_the_documented_ratios(tmp_path, capsys) -> None:
    assert parse_size("1GiB") == 1 << 30 and parse_size("256MiB") == 256 << 20
    state = gpt_state(4 << 20)
    assert any("ln_1.bias" in k for k in state) and any("wte" in k for k in state)
    assert main(["--size", "4MiB", "--rounds", "1", "--json", "--dir", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"store_save_vs_raw_write", "store_save_vs_torch_save", "store_load_verified_vs_raw_read"} <= set(doc["ratios"])
    assert {r["method"] for r in doc["rows"]} >= {"raw_write", "raw_read", "torch_save", "safetensors_save",
                                                  "store_save", "store_load_verified"}
    assert list(tmp_path.iterdir()) == []  # scratch space is cleaned up
