"""``python -m storage list|verify|inspect|export|gc STORE [RUN] [STEP|latest]`` (DESIGN.md §3).

Exit status: 0 ok; 1 something is corrupt (verify names every bad chunk; inspect/export of a
corrupt checkpoint); 2 bad usage or nothing found. ``--json`` prints one JSON object for scripts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from storage.errors import CheckpointNotFoundError, CorruptCheckpointError, StoreError
from storage.store import CheckpointStore, open_store

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or nothing found: exit 2 with one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One clear line instead of argparse's usage dump.
        raise UsageError(f"{message} (see {self.prog} --help)")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _open(url: str) -> CheckpointStore:
    if "://" not in url and not os.path.isdir(url):
        raise UsageError(f"no store at {url!r}")
    return open_store(url)


def _resolve_step(store: CheckpointStore, run: str, step: str | None) -> int:
    """A step number, or the newest committed step for 'latest'/None."""
    if step is None or step == "latest":
        steps = store.steps(run)
        if not steps:
            raise UsageError(f"run {run!r} has no committed checkpoint in {store.url}")
        return steps[-1]
    try:
        value = int(step)
    except ValueError:
        raise UsageError(f"step must be a number or 'latest', got {step!r}") from None
    if value < 0:
        raise UsageError(f"step must be >= 0, got {value}")
    return value


def _runs(store: CheckpointStore, run: str | None) -> list[str]:
    if run is None:
        return store.runs()
    if run not in store.runs():
        raise UsageError(f"no run {run!r} in {store.url}")
    return [run]


def cmd_list(args: argparse.Namespace, store: CheckpointStore) -> tuple[int, Any, list[str]]:
    lines: list[str] = []
    if args.run is None:
        runs = [{"run_id": r, "steps": store.steps(r)} for r in store.runs()]
        if not runs:
            raise UsageError(f"no runs in {store.url}")
        for r in runs:
            latest = r["steps"][-1] if r["steps"] else "-"
            lines.append(f"{r['run_id']}  checkpoints={len(r['steps'])}  latest={latest}")
        return EXIT_OK, {"store": store.url, "runs": runs}, lines
    _runs(store, args.run)
    rows = []
    for step in store.steps(args.run):
        try:
            manifest, ref = store.read_manifest(args.run, step)
            rows.append({"step": step, "manifest_hash": ref.manifest_hash, "bytes": manifest.nbytes,
                         "arrays": len(manifest.arrays), "created_unix": manifest.created_unix})
            lines.append(f"{step:>12}  {_human_bytes(manifest.nbytes):>10}  {len(manifest.arrays):>5} arrays  "
                         f"{ref.manifest_hash[:16]}")
        except CorruptCheckpointError as e:
            rows.append({"step": step, "error": str(e)})
            lines.append(f"{step:>12}  CORRUPT: {e.reason}")
    return EXIT_OK, {"store": store.url, "run_id": args.run, "checkpoints": rows}, lines


def cmd_verify(args: argparse.Namespace, store: CheckpointStore) -> tuple[int, Any, list[str]]:
    targets: list[tuple[str, int]] = []
    if args.step is not None:
        if args.run is None:
            raise UsageError("a STEP needs a RUN")
        targets = [(args.run, _resolve_step(store, args.run, args.step))]
    else:
        for run in _runs(store, args.run):
            # Every step folder, committed or not: a lost marker is damage worth reporting.
            targets += [(run, s) for s in store.step_folders(run)]
    if not targets:
        raise UsageError("nothing to verify")
    reports, lines = [], []
    # On fsspec a step folder without its marker is a save in flight (files are copied in, the
    # marker comes last) or one that died: not a checkpoint, and not a corrupt one.
    committed = None if store.backend.atomic_commit else {r: set(store.steps(r)) for r, _ in targets}
    for run, step in targets:
        if committed is not None and step not in committed[run]:
            lines.append(f"PENDING  {run}@{step}  no commit marker yet: a save in flight (or abandoned), "
                         "not a checkpoint")
            continue
        try:
            rep = store.verify(run, step)
        except CheckpointNotFoundError as e:
            raise UsageError(str(e)) from None
        reports.append(rep)
        if rep.ok:
            lines.append(f"OK       {run}@{step}  {rep.chunks_checked} chunks, {_human_bytes(rep.bytes_checked)}")
        else:
            lines.append(f"CORRUPT  {run}@{step}")
            lines += [f"  - array={p.array or '-'} chunk={p.chunk or '-'}: {p.reason}" for p in rep.problems]
    ok = all(r.ok for r in reports)
    return (EXIT_OK if ok else EXIT_CORRUPT), {"ok": ok, "checkpoints": [r.to_dict() for r in reports]}, lines


def cmd_inspect(args: argparse.Namespace, store: CheckpointStore) -> tuple[int, Any, list[str]]:
    if args.run is None:
        raise UsageError("inspect needs a RUN")
    _runs(store, args.run)
    step = _resolve_step(store, args.run, args.step)
    manifest, ref = store.read_manifest(args.run, step)
    report = store.verify(args.run, step)
    # One row per tensor: a packed one names its pack (storage.packing) in "array".
    stored = manifest.by_name()
    arrays = []
    for name, dtype, shape in manifest.tensors():
        lay = stored[manifest.array_of(name)].layout
        arrays.append({
            "name": name, "dtype": dtype, "shape": list(shape), "array": lay.name,
            "chunks": len(lay.chunks) if lay.name == name else 0,
            "bytes": math.prod(shape) * lay.dtype.itemsize,
        })
    doc = {
        "run_id": args.run, "step": step, "manifest_hash": ref.manifest_hash,
        "state_hash": report.state_hash, "verified": report.ok, "bytes": manifest.nbytes,
        "metadata": manifest.metadata, "arrays": arrays,
        "problems": [p.to_dict() for p in report.problems],
    }
    lines = [
        f"checkpoint     {args.run}@{step}",
        f"state_hash     {report.state_hash or '(unavailable: checkpoint is corrupt)'}",
        f"manifest_hash  {ref.manifest_hash}",
        f"verified       {'yes' if report.ok else 'NO'}",
        f"size           {_human_bytes(manifest.nbytes)} in {len(arrays)} tensors, "
        f"{len(manifest.arrays)} arrays",
        "metadata       " + json.dumps(manifest.metadata, sort_keys=True),
    ]
    lines += [f"  - {p}" for p in report.problems]
    if args.arrays:
        lines += [
            f"  {a['name']}  {a['dtype']}{a['shape']}  {_human_bytes(a['bytes'])}"
            + ("" if a["array"] == a["name"] else f"  (in {a['array']})")
            for a in arrays
        ]
    return (EXIT_OK if report.ok else EXIT_CORRUPT), doc, lines


def cmd_export(args: argparse.Namespace, store: CheckpointStore) -> tuple[int, Any, list[str]]:
    if args.run is None:
        raise UsageError("export needs a RUN")
    _runs(store, args.run)
    step = _resolve_step(store, args.run, args.step)
    store.export(args.run, step, args.out, args.format, prefix=args.prefix)
    doc = {"run_id": args.run, "step": step, "format": args.format, "out": os.path.abspath(args.out)}
    return EXIT_OK, doc, [f"wrote {args.run}@{step} as {args.format} to {args.out}"]


def cmd_gc(args: argparse.Namespace, store: CheckpointStore) -> tuple[int, Any, list[str]]:
    if args.run is None:
        raise UsageError("gc needs a RUN")
    _runs(store, args.run)
    try:
        deleted = store.gc(args.run, keep_last=args.keep_last, keep_every=args.keep_every,
                           protect=args.protect or ())
    except ValueError as e:
        raise UsageError(str(e)) from None
    kept = store.steps(args.run)
    doc = {"run_id": args.run, "deleted": deleted, "kept": kept}
    return EXIT_OK, doc, [f"deleted steps {deleted or 'none'}; kept {kept}"]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m storage", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, help_: str, run: str = "?", step: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("store", metavar="STORE", help="store path or fsspec URL (e.g. ./runs)")
        sp.add_argument("run", metavar="RUN", nargs=run, default=None, help="run id")
        if step:
            sp.add_argument("step", metavar="STEP", nargs="?", default=None, help="step number or 'latest'")
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        return sp

    add("list", "list runs, or a run's committed checkpoints", step=False)
    add("verify", "check every chunk hash; exit 1 naming each bad chunk")
    sp = add("inspect", "show a checkpoint's state_hash, metadata and arrays")
    sp.add_argument("--arrays", action="store_true", help="also list every array")
    sp = add("export", "write a verified checkpoint as safetensors or a torch state dict")
    sp.add_argument("--format", choices=["safetensors", "torch"], default="safetensors")
    sp.add_argument("--out", required=True, help="output file")
    sp.add_argument("--prefix", default=None, help="keep names under this prefix, stripped (e.g. model/)")
    sp = add("gc", "delete checkpoints outside the retention policy (never the newest verified)", step=False)
    sp.add_argument("--keep-last", type=int, default=3, help="keep the newest K checkpoints (K >= 1)")
    sp.add_argument("--keep-every", type=int, default=None, help="also keep every step divisible by N")
    sp.add_argument("--protect", type=int, action="append", help="a step never to delete (repeatable)")
    return p


_COMMANDS = {"list": cmd_list, "verify": cmd_verify, "inspect": cmd_inspect, "export": cmd_export, "gc": cmd_gc}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    want_json = "--json" in (argv if argv is not None else sys.argv[1:])
    try:
        args = build_parser().parse_args(argv)
        store = _open(args.store)
        code, doc, lines = _COMMANDS[args.command](args, store)
    except UsageError as e:
        return _fail(EXIT_USAGE, str(e), want_json)
    except CheckpointNotFoundError as e:
        return _fail(EXIT_USAGE, str(e), want_json)
    except CorruptCheckpointError as e:
        return _fail(EXIT_CORRUPT, str(e), want_json)
    except (StoreError, ValueError) as e:
        return _fail(EXIT_USAGE if isinstance(e, ValueError) else EXIT_CORRUPT, str(e), want_json)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print("\n".join(lines))
    return code


def _fail(code: int, message: str, want_json: bool) -> int:
    if want_json:
        print(json.dumps({"ok": False, "error": message, "exit": code}))
    print(f"storage: {message}", file=sys.stderr)
    return code
