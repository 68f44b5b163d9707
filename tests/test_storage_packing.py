"""Small tensors packed into one array per dtype (issue 11): fewer files, the same tensors for
every reader (load, verify, export, plain zarr-python), corruption still named and fallen back
past, packs shared by data-parallel ranks and linked by incremental saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import zarr
from storage_helpers import assert_same_tensors, chunk_files, flip_byte, step_path, zarr_tensor

from storage import CorruptCheckpointError, open_store, state_hash
from storage.manifest import MANIFEST
from storage.packing import PACK_GROUP


def gpt_like(seed: int, layers: int = 4) -> dict[str, torch.Tensor]:
    """Per layer two 256 KiB matrices and small norms, biases and AdamW steps."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i in range(layers):
        p = f"model/h.{i}"
        out[f"{p}.attn.weight"] = torch.randn(256, 256, generator=g)
        out[f"{p}.mlp.weight"] = torch.randn(256, 256, generator=g)
        out[f"{p}.ln.weight"] = torch.randn(256, generator=g)
        out[f"{p}.ln.bias"] = torch.randn(256, generator=g).bfloat16()
        out[f"{p}.mlp.bias"] = torch.randn(256, generator=g).bfloat16()
        out[f"optim/state/{i}/step"] = torch.tensor(float(seed + i))
    out["rng/cursor"] = torch.tensor([seed, 7], dtype=torch.int64)
    out["model/empty"] = torch.empty(0, 4)
    return out


def _store(root: Path, **kw):
    """Packs of tensors under 64 KiB: the matrices stay alone, as a GPT's big ones do."""
    return open_store(str(root), **{"chunk_bytes": 64 << 10, "pack_bytes": 64 << 10, **kw})


def test_small_tensors_are_packed_and_every_reader_sees_the_tensors(tmp_path: Path) -> None:
    state = gpt_like(1)
    packed, alone = _store(tmp_path / "packed"), _store(tmp_path / "alone", pack_bytes=0)
    for store in (packed, alone):
        store.save("r", 1, state, {"step": 1})
    files = {name: len(chunk_files(tmp_path / name, "r", 1)) for name in ("packed", "alone")}
    manifest = packed.read_manifest("r", 1)[0]
    arrays = sorted(a.layout.name for a in manifest.arrays)
    # 8 matrices alone; float32 norms + steps + the empty one in one pack, bf16 biases in another;
    # the single int64 tensor is not worth a pack.
    assert arrays == sorted([n for n in state if n.endswith(("attn.weight", "mlp.weight"))]
                            + [f"{PACK_GROUP}/bfloat16", f"{PACK_GROUP}/float32", "rng/cursor"])
    # 8 matrices x 4 chunks each, then 3 chunk files (2 packs, rng/cursor) instead of 17
    assert files == {"packed": 32 + 3, "alone": 32 + 17}
    assert packed.last_save_stats.files_written < alone.last_save_stats.files_written - 2 * 14
    assert [n for n, _, _ in manifest.tensors()] == sorted(state)
    assert json.loads((step_path(tmp_path / "packed", "r", 1) / MANIFEST).read_bytes())["format_version"] == 2
    assert json.loads((step_path(tmp_path / "alone", "r", 1) / MANIFEST).read_bytes())["format_version"] == 1

    # load, verify and state_hash see tensors, whatever the layout
    for store in (packed, alone):
        got = store.load("r", 1).tensors
        assert_same_tensors(got, state)
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in got.values())
        report = store.verify("r", 1)
        assert report.ok and report.state_hash == state_hash(state) == store.state_hash("r", 1)
    # export writes the same tensors
    out = tmp_path / "export.safetensors"
    packed.export("r", 1, str(out), "safetensors")
    from safetensors.torch import load_file

    assert_same_tensors(load_file(str(out)), state)
    # plain zarr-python, through the documented recipe
    group = zarr.open_group(str(step_path(tmp_path / "packed", "r", 1)), mode="r")
    for name, t in state.items():
        got, dtype = zarr_tensor(group, name)
        assert dtype == str(t.dtype).removeprefix("torch.") and got.shape == tuple(t.shape)
        want = t.view(torch.uint16) if t.dtype == torch.bfloat16 else t
        assert got.tobytes() == want.numpy().tobytes(), name


def test_a_flipped_byte_in_a_pack_is_named_and_load_falls_back(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.save("r", 1, gpt_like(1), {})
    store.save("r", 2, gpt_like(2), {})
    manifest = store.read_manifest("r", 2)[0]
    pack = manifest.array_of("model/h.2.ln.weight")
    assert pack == f"{PACK_GROUP}/float32"
    flip_byte(step_path(tmp_path, "r", 2) / pack / "c" / "0", 100)
    with pytest.raises(CorruptCheckpointError) as ei:
        store.load("r", 2)
    assert (ei.value.step, ei.value.array, ei.value.chunk) == (2, pack, "c/0")
    report = store.verify("r", 2)
    assert not report.ok and [(p.array, p.chunk) for p in report.problems] == [(pack, "c/0")]
    seen: list[CorruptCheckpointError] = []
    loaded = store.load_latest_verified("r", on_corrupt=seen.append)
    assert loaded.ref.step == 1 and [e.step for e in seen] == [2]
    assert_same_tensors(loaded.tensors, gpt_like(1))


def test_a_manifest_whose_members_do_not_tile_the_pack_is_refused(tmp_path: Path) -> None:
    from storage.hashing import bytes_hash
    from storage.manifest import MARKER, encode_marker

    store = _store(tmp_path)
    store.save("r", 1, gpt_like(1), {})
    folder = step_path(tmp_path, "r", 1)
    doc = json.loads((folder / MANIFEST).read_bytes())
    pack = next(a for a in doc["arrays"] if a["name"] == f"{PACK_GROUP}/float32")
    pack["packed"][1]["offset"] += 1  # overlapping members
    data = json.dumps(doc).encode()
    (folder / MANIFEST).write_bytes(data)
    (folder / MARKER).write_bytes(encode_marker("r", 1, bytes_hash(data)))  # a consistent forgery
    with pytest.raises(CorruptCheckpointError, match="bad pack"):
        store.load("r", 1)


def test_a_tensor_named_like_a_pack_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with pytest.raises(ValueError, match="reserved for packed small tensors"):
        store.save("r", 1, {f"{PACK_GROUP}/float32": torch.zeros(3), "w": torch.zeros(3)}, {})
    assert store.runs() == []


def test_ranks_writing_shares_commit_the_same_packs_as_one_save(tmp_path: Path) -> None:
    state = gpt_like(3)
    single, sharded = _store(tmp_path / "one"), _store(tmp_path / "two")
    single.save("r", 5, state, {"step": 5})
    plan = sharded.plan_shards(state, 2)
    assert any(p.startswith(f"{PACK_GROUP}/") for share in plan for p in share)
    receipts = [sharded.write_share("r", 5, state, session="s", rank=r, world_size=2) for r in (0, 1)]
    sharded.commit_shares("r", 5, receipts, {"step": 5}, session="s")
    a, b = single.read_manifest("r", 5)[0], sharded.read_manifest("r", 5)[0]
    assert [(e.layout, e.hashes, e.members) for e in a.arrays] == [(e.layout, e.hashes, e.members) for e in b.arrays]
    assert a.state_hash == b.state_hash == state_hash(state)
    assert_same_tensors(sharded.load("r", 5).tensors, state)


def test_an_unchanged_pack_is_linked_by_an_incremental_save(tmp_path: Path) -> None:
    store = _store(tmp_path, incremental=True)
    first = gpt_like(1)
    store.save("r", 1, first, {})
    second = dict(first)
    second["model/h.0.attn.weight"] = first["model/h.0.attn.weight"] + 1  # only a matrix moves
    store.save("r", 2, second, {})
    stats = store.last_save_stats
    assert stats.bytes_written == second["model/h.0.attn.weight"].numel() * 4
    for pack in (f"{PACK_GROUP}/float32", f"{PACK_GROUP}/bfloat16"):
        chunk = step_path(tmp_path, "r", 2) / pack / "c" / "0"
        assert chunk.stat().st_nlink == 2  # the same file as step 1's
    third = dict(second)
    third["model/h.1.ln.weight"] = second["model/h.1.ln.weight"] * 2  # one small tensor moves
    store.save("r", 3, third, {})
    pack = store.read_manifest("r", 3)[0].by_name()[f"{PACK_GROUP}/float32"].layout
    assert store.last_save_stats.bytes_written == sum(c.nbytes for c in pack.chunks)  # that pack only
    assert_same_tensors(store.load("r", 3).tensors, third)
