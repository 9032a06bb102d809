"""The core's part of a state dict, and loading a whole state dict all or nothing.

``state_dict(core)`` is the ``"fastsam"`` entry beside torch's ``state`` and
``param_groups`` (fastsam/integrations/checkpoints.py describes the layout).  ``load``
checks everything a state dict holds against the optimizer before it changes anything
(the parameter layout, the shapes of the state the fused steps read, every setting),
then applies it inside one transaction.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import torch

from .. import _checks
from ..integrations import checkpoints
from .state import Settings, check_group
from .txn import Transaction

if TYPE_CHECKING:
    from .buckets import Bucket
    from .engine import SAMCore

# State the fused base steps read as tensors shaped like their parameter.
_PARAM_SHAPED = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def flat_params(core: SAMCore) -> List[torch.Tensor]:
    return [p for g in core.base.param_groups for p in g["params"]]


def state_dict(core: SAMCore) -> Dict[str, Any]:
    """The ``"fastsam"`` entry of a state dict: step count, switches, settings, variant buffers."""
    s, run = core.settings, core.run
    save = getattr(s.schedule, "state_dict", None)
    params = flat_params(core)
    buffers = {name: [core.sam_state.get(p, {}).get(name) for p in params] for name in core.ext.buffers}
    return {
        "format": checkpoints.FORMAT,
        "class": core.ext.name,
        "num_steps": run.num_steps,
        "sam_active_override": run.sam_active_override,
        "schedule": save() if callable(save) else None,
        **{name: getattr(s, name) for name in Settings.SAVED},
        "buffers": buffers,
        "variant": core.ext.state_dict(),
    }


def load(
    core: SAMCore,
    sd: Any,
    kind: str = "sam",
    extra: Optional[Callable[[Dict[str, Any], Transaction], None]] = None,
) -> None:
    """Load ``sd`` (any layout ``checkpoints.to_current`` knows) into ``core``: all or nothing.

    ``extra(part, tx)``, where given, checks and applies an optimizer's own entries of the
    ``"fastsam"`` part (MomentumSAM's perturbation); it runs after the checks below and may
    register writes with ``tx``."""
    sd, note = checkpoints.to_current(sd, kind)
    part = sd["fastsam"]
    params = flat_params(core)
    groups = _checked_groups(core, sd)
    _check_state(core, sd["state"], groups)
    values: Dict[str, Any] = {}
    apply_variant: Callable[[], None] = lambda: None
    buffers: Dict[str, list] = {}
    if part is not None:
        if part.get("class") not in (core.ext.name, "FusedSAM"):  # plain SAM state continues under a variant
            raise ValueError(f"state_dict is a {part.get('class')} state dict, this optimizer is {core.ext.name}")
        missing = [
            k for k in ("num_steps", "sam_active_override", "schedule", "buffers", *Settings.SAVED) if k not in part
        ]
        if missing:
            raise ValueError(f"state_dict['fastsam'] lacks {missing}")
        values = core.settings.checked({k: part[k] for k in Settings.SAVED})
        values["num_steps"] = _checks.integer("num_steps", part["num_steps"], lo=0)
        values["sam_active_override"] = _checks.flag("sam_active_override", part["sam_active_override"], none=True)
        buffers = _checked_buffers(core, part["buffers"], params)
        apply_variant = core.ext.load_state_dict(part.get("variant") or {})
    tx = Transaction(core.snapshots)
    tx.ordered = True
    try:
        _load_schedule(core, part, tx)
        base, old_state, old_groups = core.base, core.base.state, core.base.param_groups
        base.load_state_dict({"state": sd["state"], "param_groups": groups})
        tx.on_undo(lambda: base.__setstate__({"state": old_state, "param_groups": old_groups}))
        pending = core.run.pending
        if pending is not None:  # between first_step and second_step: back to w first
            for b in pending.buckets:

                def restore(b: Bucket = b) -> None:
                    b.backend.restore(b.params, b.copies)

                tx.write(restore, b.params)
        if extra is not None and part is not None:
            extra(part, tx)
        tx.commit()
    except BaseException:
        tx.rollback()
        raise
    if pending is not None:
        core.run.pending = None
        core.ext.undone(core)
    run = core.run
    for name in Settings.SAVED:
        if name in values:
            setattr(core.settings, name, values[name])
    if "num_steps" in values:
        run.num_steps, run.sam_active_override = values["num_steps"], values["sam_active_override"]
    run.decision = None
    for name, ts in buffers.items():
        for p, t in zip(params, ts):
            if t is None:
                core.sam_state.get(p, {}).pop(name, None)
            else:
                core.sam_state.setdefault(p, {})[name] = t
    apply_variant()
    core.forget()
    if note == "plain":
        warnings.warn(
            "FusedSAM.load_state_dict: " + checkpoints.plain_warning(run.num_steps, not sd["state"]),
            UserWarning,
            stacklevel=3,
        )


def _checked_groups(core: SAMCore, sd: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The state dict's param groups, with rho and adaptive checked (filled in from the
    defaults where a plain checkpoint lacks them), against this optimizer's layout."""
    theirs = sd.get("param_groups")
    state = sd.get("state")
    if not isinstance(theirs, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in theirs
    ):
        raise ValueError("state_dict['param_groups'] must be a list of dicts with a 'params' list")
    if not isinstance(state, dict):
        raise ValueError("state_dict['state'] must be a dict")
    mine = core.base.param_groups
    if len(theirs) != len(mine) or any(len(a["params"]) != len(b["params"]) for a, b in zip(mine, theirs)):
        raise ValueError(
            "state_dict has a different parameter layout: "
            f"{[len(g['params']) for g in theirs]} parameters per group, this optimizer has "
            f"{[len(g['params']) for g in mine]}"
        )
    out = []
    defaults = core.optimizer().defaults
    for gi, g in enumerate(theirs):
        g = dict(g)
        g.setdefault("rho", defaults["rho"])
        g.setdefault("adaptive", defaults["adaptive"])
        check_group(g, gi)
        out.append(g)
    return out


def _check_state(core: SAMCore, state: Dict[Any, Any], groups: List[Dict[str, Any]]) -> None:
    """The per-parameter state the fused steps read must be shaped like its parameter."""
    by_id: Dict[Any, torch.Tensor] = {}
    for mine, theirs in zip(core.base.param_groups, groups):
        by_id.update(zip(theirs["params"], mine["params"]))
    for key, st in state.items():
        p = by_id.get(key)
        if p is None:
            raise ValueError(f"state_dict['state'] has an entry for parameter id {key!r}, which no param group lists")
        if not isinstance(st, dict):
            raise ValueError(f"state_dict['state'][{key!r}] must be a dict, got {type(st).__name__}")
        for name in _PARAM_SHAPED:
            t = st.get(name)
            if t is not None and (not torch.is_tensor(t) or t.shape != p.shape):
                raise ValueError(
                    f"state_dict['state'][{key!r}][{name!r}] must be a tensor of shape "
                    f"{tuple(p.shape)} (its parameter's), got "
                    f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}"
                )
        step = st.get("step")
        if step is not None and torch.is_tensor(step) and step.numel() != 1:
            raise ValueError(
                f"state_dict['state'][{key!r}]['step'] must hold one number, got shape {tuple(step.shape)}"
            )


def _checked_buffers(core: SAMCore, buffers: Any, params: List[torch.Tensor]) -> Dict[str, list]:
    if not isinstance(buffers, dict):
        raise ValueError("state_dict['fastsam']['buffers'] must be a dict")
    out: Dict[str, list] = {}
    for name, ts in buffers.items():
        if name not in core.ext.buffers:
            raise ValueError(f"state_dict['fastsam']['buffers'] has {name!r}, which {core.ext.name} does not keep")
        if not isinstance(ts, (list, tuple)) or len(ts) != len(params):
            raise ValueError(
                f"state_dict has {len(ts) if isinstance(ts, (list, tuple)) else ts!r} '{name}' "
                f"buffers, this optimizer has {len(params)} parameters"
            )
        kept: List[Optional[torch.Tensor]] = []
        for i, (p, t) in enumerate(zip(params, ts)):
            if t is None:
                kept.append(None)
                continue
            view = torch.view_as_real(p) if p.is_complex() else p
            if not torch.is_tensor(t) or t.shape != view.shape:
                raise ValueError(
                    f"state_dict['fastsam']['buffers'][{name!r}][{i}] must be a tensor of shape "
                    f"{tuple(view.shape)}, got {tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}"
                )
            kept.append(t.detach().to(device=view.device, dtype=view.dtype, copy=True))
        out[name] = kept
    return out


def _load_schedule(core: SAMCore, part: Optional[Dict[str, Any]], tx: Transaction) -> None:
    schedule = core.settings.schedule
    saved = None if part is None else part.get("schedule")
    load = getattr(schedule, "load_state_dict", None)
    if saved is None or not callable(load):
        return
    save = getattr(schedule, "state_dict", None)
    before = save() if callable(save) else None
    if before is not None:
        tx.on_undo(lambda: load(before))
    load(saved)
