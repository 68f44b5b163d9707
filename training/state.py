"""Training state as named tensors + JSON, and back, exactly.

Names are readable and stable because they use parameter names, never optimizer indices:
    model/<param name>                    e.g. model/transformer.h.0.attn.c_attn.weight
    optim/state/<param name>/<key>        e.g. optim/state/transformer.wte.weight/exp_avg
The optimizer's step counts are 0-d tensors among them, so a restore is bit-exact. Optimizer
hyperparameters (lr, betas, ...) and the data cursor go into the JSON side.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.data import DataCursor

MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/state/"
_RESERVED_META = ("step", "epoch", "position", "param_groups")
# Param-group keys that say how the optimizer runs here, not what it computes: a checkpoint made
# with fused kernels on a GPU must not switch them on for a CPU restore.
_IMPLEMENTATION_KEYS = {"foreach", "fused", "capturable", "differentiable", "param_names"}


def _live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() lists a tied weight once, under its first name: the one we store.
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    # No copy when the tensor is already a contiguous CPU tensor: the store writes it straight
    # out. The result aliases live state, so write (or clone) it before the next training step.
    t = t.detach()
    if t.device.type == "cpu" and t.is_contiguous():
        return t
    return t.to("cpu").contiguous()


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()  # a tensor lr (capturable setups) stores as its number
    return value


def capture_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    cursor: DataCursor,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Named CPU tensors of model and optimizer state, and JSON metadata.

    The metadata is {"step", "epoch", "position", "param_groups", **extra}; extra must not reuse
    those keys. Tensors already on CPU are returned without copying (see module docstring).
    """
    extra = extra or {}
    clash = sorted(set(extra) & set(_RESERVED_META))
    if clash:
        raise ValueError(f"extra metadata may not use reserved keys {clash}")
    names = _param_names(model)
    tensors = {MODEL_PREFIX + name: _to_cpu(t) for name, t in _live_tensors(model).items()}
    for param, param_state in optimizer.state.items():
        if id(param) not in names:
            raise ValueError("the optimizer holds state for a tensor that is not a model parameter")
        for key, value in param_state.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"optimizer state {names[id(param)]}/{key} is not a tensor")
            tensors[f"{OPTIM_PREFIX}{names[id(param)]}/{key}"] = _to_cpu(value)
    groups = []
    for group in optimizer.param_groups:
        saved = {k: _jsonable(v) for k, v in group.items() if k not in ("params", "param_names")}
        saved["params"] = [names[id(p)] for p in group["params"]]
        groups.append(saved)
    meta = {
        "step": step,
        "epoch": cursor.epoch,
        "position": cursor.position,
        "param_groups": groups,
        **extra,
    }
    return tensors, meta


def _show(names: set[str], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def _check_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Raise unless the names match the model exactly; return optim name -> (param, key)."""
    params = dict(model.named_parameters())
    expected = {MODEL_PREFIX + name for name in _live_tensors(model)}
    given = {name for name in tensors if name.startswith(MODEL_PREFIX)}
    unexpected = given - expected
    optim: dict[str, tuple[str, str]] = {}
    for name in tensors:
        if name.startswith(MODEL_PREFIX):
            continue
        param, _, key = name.removeprefix(OPTIM_PREFIX).rpartition("/")
        if not name.startswith(OPTIM_PREFIX) or param not in params or not key:
            unexpected.add(name)
        else:
            optim[name] = (param, key)
    missing = expected - given
    if missing or unexpected:
        raise ValueError(
            "checkpoint tensors do not match the model: "
            f"missing [{_show(missing)}], unexpected [{_show(unexpected)}]"
        )
    return optim


def _check_shapes(
    model: nn.Module, tensors: dict[str, torch.Tensor], optim: dict[str, tuple[str, str]]
) -> None:
    params = dict(model.named_parameters())
    bad = []
    for name, live in _live_tensors(model).items():
        t = tensors[MODEL_PREFIX + name]
        if t.shape != live.shape or t.dtype != live.dtype:
            bad.append(
                f"{MODEL_PREFIX}{name} is {tuple(t.shape)} {t.dtype}, "
                f"model has {tuple(live.shape)} {live.dtype}"
            )
    for name, (param, _) in optim.items():
        t, live = tensors[name], params[param]
        # Per-element state (exp_avg, ...) has the parameter's shape; counters are 0-d.
        if t.dim() != 0 and t.shape != live.shape:
            bad.append(f"{name} is {tuple(t.shape)}, parameter has {tuple(live.shape)}")
    if bad:
        raise ValueError("checkpoint tensors do not fit the model: " + "; ".join(bad[:5]))


def restore_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> tuple[int, DataCursor]:
    """Load what `capture_state` produced back into model and optimizer; returns (step, cursor).

    Everything is checked before anything is changed, so a failed restore leaves the model and
    optimizer as they were.

    Raises:
        ValueError: missing, unexpected or mis-shaped tensor names, or param groups that differ.
    """
    missing_meta = [k for k in _RESERVED_META if k not in meta]
    if missing_meta:
        raise ValueError(f"checkpoint metadata lacks {missing_meta}")
    optim = _check_names(model, tensors)
    _check_shapes(model, tensors, optim)
    names = _param_names(model)
    saved_groups = meta["param_groups"]
    live_groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if [g["params"] for g in saved_groups] != live_groups:
        raise ValueError("checkpoint optimizer param groups differ from this optimizer's")
    cursor = DataCursor(int(meta["epoch"]), int(meta["position"]))

    with torch.no_grad():
        for name, live in _live_tensors(model).items():
            live.copy_(tensors[MODEL_PREFIX + name])
    # Hand the state to the optimizer in its own state_dict format (indices in group order), so it
    # applies its device and dtype rules. Clone: load_state_dict keeps CPU tensors as given, and
    # the optimizer must not share memory with the caller's arrays.
    index = {name: i for i, name in enumerate(n for group in live_groups for n in group)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, (param, key) in optim.items():
        state.setdefault(index[param], {})[key] = tensors[name].clone()
    groups = []
    for live, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        merged = {k: v for k, v in live.items() if k != "params"}
        for k, v in saved.items():
            if k in merged and k not in _IMPLEMENTATION_KEYS:
                merged[k] = tuple(v) if isinstance(v, list) else v  # JSON lists back to tuples
        merged["params"] = [index[n] for n in saved["params"]]
        groups.append(merged)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return int(meta["step"]), cursor
