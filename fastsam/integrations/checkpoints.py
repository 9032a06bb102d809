"""State-dict layouts other than the current one, converted to it.

The current layout is torch's, plus one key of fastsam's own::

    {"state": {...}, "param_groups": [...], "fastsam": {"format": 2, ...}}

so that tools reading ``param_groups`` or handing optimizer state to torch's distributed
checkpoint see an ordinary optimizer.  Also loaded:

- fastsam's first layout, ``{"base": <base optimizer state dict>, "sam": {...}}`` (plus
  ``"variant"`` for LookSAM, GSAM and FriendlySAM) and MomentumSAM's ``{"base", "msam"}``;
- a plain ``{"state", "param_groups"}`` dict: a checkpoint of the widely used SAM class, of
  pytorch_optimizer's SAM, or of a plain base optimizer.  It loads as the base optimizer's
  state, with a warning: it holds no SAM step count or settings, and the SAM classes'
  restore copies (``old_p``, ``e_w``) are dropped.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

FORMAT = 2
LEGACY_KEYS = ("old_p", "e_w")  # restore copies other SAM classes keep in their per-parameter state
_V1_SAM = (
    "num_steps",
    "sam_start_step",
    "schedule",
    "sam_active_override",
    "perturb_eps",
    "max_grad_norm",
    "perturbation",
)
_V1_MSAM = ("num_steps", "perturbed", "w", "schedule", "sam_start_step", "max_grad_norm", "perturb_eps")


def to_current(sd: Any, kind: str) -> Tuple[Dict[str, Any], Optional[str]]:
    """``sd`` in the current layout, and what a warning should say about it (or None).

    ``kind`` is "sam" for FusedSAM and its variants, "msam" for MomentumSAM.  Raises
    ValueError for anything that is not one of the layouts above."""
    if not isinstance(sd, dict):
        raise ValueError(f"state_dict must be a dict, got {type(sd).__name__}")
    keys = set(sd)
    if "fastsam" in keys and {"state", "param_groups"} <= keys:
        return sd, None
    if keys == {"state", "param_groups"}:
        state = {}
        for k, v in sd["state"].items():
            kept = {n: t for n, t in v.items() if n not in LEGACY_KEYS} if isinstance(v, dict) else v
            if kept:
                state[k] = kept
        return {"state": state, "param_groups": sd["param_groups"], "fastsam": None}, "plain"
    if kind == "sam" and keys in ({"base", "sam"}, {"base", "sam", "variant"}):
        base = _base(sd["base"])
        sam = sd["sam"]
        if not isinstance(sam, dict) or not set(_V1_SAM) <= set(sam):
            raise ValueError("state_dict['sam'] lacks entries of fastsam's first state-dict layout")
        variant = sd.get("variant") or {}
        extra = {k: v for k, v in variant.items() if k not in ("class", "buffers")}
        part = {
            "format": FORMAT,
            "class": variant.get("class", "FusedSAM"),
            **{k: sam[k] for k in _V1_SAM},
            "buffers": variant.get("buffers", {}),
            "variant": extra,
        }
        return {**base, "fastsam": part}, None
    if kind == "msam" and keys == {"base", "msam"}:
        base = _base(sd["base"])
        m = sd["msam"]
        if not isinstance(m, dict) or not set(_V1_MSAM) <= set(m):
            raise ValueError("state_dict['msam'] lacks entries of MomentumSAM's first state-dict layout")
        part = {
            "format": FORMAT,
            "class": "MomentumSAM",
            "sam_active_override": None,
            "perturbation": "local",
            "closure_convention": "torch",
            "buffers": {},
            "variant": {},
            **{k: m[k] for k in _V1_MSAM},
            "scalars": m.get("scalars"),
            "inv_norm": m.get("inv_norm"),
            "rho": m.get("rho"),
        }
        return {**base, "fastsam": part}, None
    raise ValueError(
        "state_dict is not a state dict of this optimizer: expected torch's layout with a 'fastsam' entry "
        "(written by state_dict()), fastsam's first layout ({'base', 'sam'} or {'base', 'msam'}), or a plain "
        f"{{'state', 'param_groups'}} optimizer state dict; got the keys {sorted(map(str, keys))}"
    )


def _base(base: Any) -> Dict[str, Any]:
    if not isinstance(base, dict) or not {"state", "param_groups"} <= set(base):
        raise ValueError("state_dict['base'] is not an optimizer state dict (no 'state' and 'param_groups')")
    return {"state": base["state"], "param_groups": base["param_groups"]}


def plain_warning(num_steps: int, empty: bool) -> str:
    return (
        "loaded a plain {'state', 'param_groups'} state dict (another SAM class's or a base optimizer's) "
        "as the base optimizer's state.  It lacks fastsam's step count "
        f"(num_steps stays {num_steps}), sam_start_step/schedule and the SAM settings"
        + (
            "; it holds no base-optimizer state either (momentum, Adam moments: the widely used SAM "
            "class does not save them), so those start from zero"
            if empty
            else ""
        )
        + "."
    )
