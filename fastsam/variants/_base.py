"""What the two-pass variants share: a FusedSAM subclass with one more entry in its state dict."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..optim import FusedSAM


class VariantSAM(FusedSAM):
    """FusedSAM plus per-parameter variant buffers (``self.state[p][name]``) saved in ``state_dict()["variant"]``."""

    _buffers: tuple = ()  # names of the per-parameter buffers that must survive a resume

    def _variant_extra(self) -> Dict[str, Any]:
        return {}

    def _load_variant_extra(self, d: Dict[str, Any]) -> None:
        pass

    def _all_params(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _buf(self, key: torch.Tensor, name: str, like: torch.Tensor, zero: bool = False) -> torch.Tensor:
        st = self.state[key]
        t = st.get(name)
        if t is None or t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
            t = torch.zeros_like(like) if zero else torch.empty_like(like)
            st[name] = t
        return t

    def _bucket_cache(self, b, kind: str) -> dict:
        """A dict stored on the bucket object ``b`` itself (so it dies with the bucket when the
        gradient pattern changes and ``Plan`` builds new ones: nothing here keeps old buckets, or
        their gradients, alive), valid until ``_drop_bucket_caches(kind)`` (a token per kind)."""
        tokens = self.__dict__.setdefault("_bucket_tokens", {})
        tok = tokens.get(kind)
        if tok is None:
            tok = tokens[kind] = object()
        slots = b.__dict__.setdefault("_variant_caches", {})
        hit = slots.get(kind)
        if hit is None or hit[0] is not tok:
            hit = slots[kind] = (tok, {})
        return hit[1]

    def _drop_bucket_caches(self, kind: str) -> None:
        self.__dict__.get("_bucket_tokens", {}).pop(kind, None)

    def _bufs(self, b, name: str, zero: bool = False) -> List[torch.Tensor]:
        """Bucket ``b``'s buffers ``name`` (``_buf`` per parameter), cached on the bucket object
        (``_bucket_cache``) and dropped by ``load_state_dict``: 11 ``_buf`` lookups were ~20 us a step."""
        cache = self._bucket_cache(b, "bufs")
        hit = cache.get(name)
        if hit is None:
            hit = cache[name] = [self._buf(k, name, p, zero) for k, p in zip(b.keys, b.params)]
        return hit

    # Caches that hold buckets (whose .backend is a module) or are keyed by their identity:
    # dropped when pickled or deep-copied, rebuilt lazily.
    _unpickled: tuple = ("_bucket_tokens", "_pending_m", "_full_buckets", "_full_stale")

    def __getstate__(self) -> Dict[str, Any]:
        st = super().__getstate__()
        for name in self._unpickled:
            st.pop(name, None)
        return st

    def state_dict(self) -> Dict[str, Any]:
        d = super().state_dict()
        bufs = {name: [self.state[p].get(name) if p in self.state else None for p in self._all_params()]
                for name in self._buffers}
        d["variant"] = {"class": type(self).__name__, "buffers": bufs, **self._variant_extra()}
        return d

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        v: Optional[Dict[str, Any]] = state_dict.pop("variant", None)
        if v is not None and v.get("class") != type(self).__name__:
            raise ValueError(f"state_dict is a {v.get('class')} state dict, this optimizer is {type(self).__name__}")
        super().load_state_dict(state_dict)
        self._drop_bucket_caches("bufs")  # the buffers are replaced below
        if v is None:
            return
        params = self._all_params()
        for name, ts in v["buffers"].items():
            if len(ts) != len(params):
                raise ValueError(f"state_dict has {len(ts)} '{name}' buffers, this optimizer has {len(params)} parameters")
            for p, t in zip(params, ts):
                if t is None:
                    self.state[p].pop(name, None)
                else:
                    self.state[p][name] = t.detach().to(device=p.device, dtype=p.dtype, copy=True)
        self._load_variant_extra(v)
