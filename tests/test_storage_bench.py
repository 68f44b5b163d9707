"""The checkpoint benchmark at a tiny size: every number is what its name says (the real run is
1 GiB, by hand). Two rounds, so the alternating order and the spread are exercised."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from bench.checkpoint import disk_seq_read, disk_seq_write, gpt_state, main, parse_size
from bench.save_phases import PHASES


def test_disk_seq_baseline_writes_and_reads_the_same_bytes(tmp_path) -> None:
    state = gpt_state(1 << 20, seed=3)
    path = str(tmp_path / "seq.bin")
    disk_seq_write(state, path)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    assert (tmp_path / "seq.bin").stat().st_size == nbytes
    expected = torch.cat([t.reshape(-1).view(torch.uint8) for t in state.values()])
    assert torch.equal(disk_seq_read(path, nbytes), expected)


def test_bench_numbers_are_consistent(tmp_path, capsys) -> None:
    assert parse_size("1GiB") == 1 << 30 and parse_size("256MiB") == 256 << 20
    state = gpt_state(4 << 20)
    assert any("ln_1.bias" in k for k in state) and any("wte" in k for k in state)
    assert main(["--size", "4MiB", "--rounds", "2", "--json", "--dir", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    nbytes, samples = doc["size_bytes"], doc["seconds"]
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {"disk_seq_write", "disk_seq_read", "raw_write", "raw_read", "torch_save",
                         "torch_load", "safetensors_save", "safetensors_load", "store_save",
                         "store_save_fsync", "store_load_verified"}
    med = {}
    for name, row in rows.items():
        secs = samples[name]
        assert len(secs) == 2 and all(s > 0 for s in secs), name
        med[name] = statistics.median(secs)
        assert row["seconds"] == pytest.approx(med[name], abs=1e-4), name
        assert row["seconds_min"] <= row["seconds"] <= row["seconds_max"], name
        assert row["seconds_min"] == pytest.approx(min(secs), abs=1e-4), name
        # Throughput is the state's bytes over that time, and its range mirrors the time's.
        assert row["gbps"] == pytest.approx(statistics.median(nbytes / s / 1e9 for s in secs), abs=1e-3)
        assert row["gbps_min"] == pytest.approx(nbytes / max(secs) / 1e9, abs=1e-3), name
        assert row["gbps_min"] <= row["gbps"] <= row["gbps_max"], name
    # Each ratio is the quotient of its two rows' medians, named reference first.
    pairs = {"store_save_vs_disk_seq_write": ("disk_seq_write", "store_save"),
             "store_save_vs_safetensors_save": ("safetensors_save", "store_save"),
             "store_save_vs_torch_save": ("torch_save", "store_save"),
             "store_save_vs_raw_write": ("raw_write", "store_save"),
             "store_load_verified_vs_disk_seq_read": ("disk_seq_read", "store_load_verified"),
             "store_load_verified_vs_raw_read": ("raw_read", "store_load_verified")}
    assert set(doc["ratios"]) == set(pairs)
    for name, (ref, mine) in pairs.items():
        assert doc["ratios"][name] == pytest.approx(med[ref] / med[mine], abs=1e-3), name
    assert rows["store_save"]["vs_disk_seq"] == pytest.approx(med["disk_seq_write"] / med["store_save"], abs=1e-3)
    # Alternating order: the second round runs the pairs backwards, each read after its write.
    first, second = doc["order"]
    assert sorted(first) == sorted(second) and first != second
    assert first[:2] == ["disk_seq_write", "disk_seq_read"] and second[-2:] == first[:2]
    for order in (first, second):
        for w, r in (("disk_seq_write", "disk_seq_read"), ("store_save", "store_load_verified")):
            assert order.index(r) == order.index(w) + 1
    # The phases of one save add up to it, and the counts fit its layout.
    ph = doc["phases"]
    assert all(ph[k] >= 0 for k in PHASES if k != "other_s")
    assert sum(ph[k] for k in PHASES) == pytest.approx(ph["total_s"])
    assert 0 <= ph["other_s"] < ph["total_s"]
    assert ph["bytes"] == nbytes and ph["tensors"] == len(state) == doc["tensors"]
    assert 1 <= ph["arrays"] < ph["tensors"]  # the small tensors went into packs
    assert ph["chunks"] >= ph["arrays"]
    # One file per chunk and per array's zarr.json, plus group documents, manifest and marker.
    assert ph["files_created"] >= ph["chunks"] + ph["arrays"] + 2
    assert ph["renames"] >= 1 and ph["write_calls"] >= ph["files_created"]
    assert ph["syncfs"] == 1 if ph["durability"] == "syncfs" else ph["fsyncs"] >= ph["files_created"]
    assert list(tmp_path.iterdir()) == []  # scratch space is cleaned up
