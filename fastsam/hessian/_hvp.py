"""The Hessian operator: batching/weighting, the two HVP modes, state restore, distributed average.

Everything in :mod:`fastsam.hessian` goes through :class:`HessianOperator`. It is a context
manager: entering it puts the model into the requested mode, leaving it restores the per-module
``training`` flags, every buffer (running statistics) and every parameter's ``.grad`` exactly.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union, cast

import torch
import torch.distributed as dist
from torch import nn

from .._checks import ArgumentError, choice, flag, integer

HVP_MODES = ("double_backward", "forward_over_reverse")
LossFn = Callable[[Any, Any], torch.Tensor]  # loss_fn(outputs, targets) -> a scalar tensor
Products = Sequence[Optional[torch.Tensor]]  # per trainable parameter: its part of H v (None: no dependence)
MODEL_MODES = ("train", "eval")


def _is_pair(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2


def as_batches(data: Any) -> List[Tuple[Any, Any]]:
    """Normalise ``data`` into a list of ``(inputs, targets)`` batches.

    ``data`` is one batch (a 2-tuple/list whose first item is a tensor, tuple of tensors or dict)
    or an iterable of such batches (list, generator, DataLoader). Iterables are consumed once.
    """
    if data is None:
        raise ValueError("data must be an (inputs, targets) batch or an iterable of batches, got None")
    if _is_pair(data) and not _is_pair(data[0]):
        batches = [tuple(data)]
    else:
        try:
            batches = list(data)
        except TypeError:
            raise TypeError(
                f"data must be an (inputs, targets) batch or an iterable of batches, got {type(data).__name__}"
            ) from None
    if not batches:
        raise ValueError("data is empty: it must contain at least one (inputs, targets) batch")
    for i, b in enumerate(batches):
        if not _is_pair(b):
            raise TypeError(f"data batch {i} must be an (inputs, targets) pair, got {type(b).__name__}")
        if batch_size(b) < 1:
            raise ValueError(f"data batch {i} is empty (batch size 0)")
    return [tuple(b) for b in batches]


def batch_size(batch: Tuple[Any, Any]) -> int:
    inputs, targets = batch
    for t in (targets, inputs):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    for t in inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ():
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    raise TypeError(
        "cannot infer the batch size of a data batch: targets or inputs must be a tensor with a leading batch dimension"
    )


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _call_args(inputs: Any) -> Tuple[Tuple[Any, ...], Optional[Dict[str, Any]]]:
    """How ``inputs`` are passed to the model: a dict as keywords, a tuple/list as positionals."""
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), None
    return (inputs,), None


def _call(model: Callable[..., Any], inputs: Any) -> Any:
    args, kwargs = _call_args(inputs)
    return model(*args, **(kwargs or {}))


def trainable_parameters(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    named: List[Tuple[str, torch.Tensor]] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameters with requires_grad=True")
    return named


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: torch.Tensor, model: nn.Module) -> List[torch.Tensor]:
    """Split a flat vector into a list shaped like the model's trainable parameters (in
    ``model.named_parameters()`` order, skipping parameters with ``requires_grad=False``)."""
    params = [p for _, p in trainable_parameters(model)]
    n = sum(p.numel() for p in params)
    if vec.dim() != 1 or vec.numel() != n:
        raise ValueError(f"vec must be a flat tensor with {n} entries, got shape {tuple(vec.shape)}")
    return [c.view_as(p) for c, p in zip(vec.split([p.numel() for p in params]), params)]


class HessianOperator:
    """Hessian-vector products of the sample-averaged loss, as a matrix-free symmetric operator.

    ``op.matvec(v)`` takes and returns a flat 1-D tensor of length ``op.n`` (trainable parameters
    concatenated in ``named_parameters()`` order) on ``op.device``, in ``v``'s dtype. Use it as a
    context manager (``with HessianOperator(...) as op:``); outside the ``with`` block the model
    state is untouched.

    The operator is H = sum_b (n_b / N) H_b, the Hessian of ``loss_fn`` averaged over all N samples
    (batch b has n_b samples; ``loss_fn`` is a mean-reduced loss). Inside an initialised process
    group (``distributed=None`` detects it) N counts the samples of all ranks and the per-rank sums
    are all-reduced, so every rank gets the same product. In ``model_mode="train"`` every product
    reuses the same RNG seed per batch (derived from ``seed``; fresh when None, rank 0's in a
    process group), so dropout masks are fixed and H is one fixed matrix; the global RNG state
    is left unchanged.

    Graph reuse (``hvp_mode="double_backward"``): the first product of a batch runs its forward
    and a ``create_graph`` backward once and keeps that first-order graph; every later product
    of the batch is one backward through it (as PyHessian does for a single batch), instead of
    forward + two backwards. Kept graphs are bounded by ``cache_bytes`` (bytes of the tensors the
    graph saves, counted with saved-tensor hooks; default: half of the free device memory on a
    GPU, a quarter of the available memory on the CPU): batches beyond the budget are recomputed
    per product, as before, so memory stays bounded by the budget plus one batch's graph.
    ``cache_graph=False`` recomputes every batch; ``cache_graph=True`` keeps every graph whatever
    the budget. The graphs are freed when the ``with`` block exits. ``op.num_cached`` says how
    many batches are kept.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        *,
        hvp_mode: str = "double_backward",
        model_mode: str = "eval",
        distributed: Optional[bool] = None,
        process_group: Any = None,
        seed: Optional[int] = None,
        cache_graph: Optional[bool] = None,
        cache_bytes: Optional[int] = None,
    ) -> None:
        # every argument is checked before ``data`` (perhaps a one-shot iterable) is consumed and
        # before the first collective, so a bad call changes nothing and deadlocks no rank
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets)")
        self.hvp_mode = choice("hvp_mode", hvp_mode, HVP_MODES)
        self.model_mode = choice("model_mode", model_mode, MODEL_MODES)
        seed = integer("seed", seed, none=True)
        cache_graph = flag("cache_graph", cache_graph, none=True)
        cache_bytes = integer("cache_bytes", cache_bytes, lo=0, none=True)
        distributed = flag("distributed", distributed, none=True)
        if cache_graph and self.hvp_mode != "double_backward":
            raise ArgumentError(
                "cache_graph=True needs hvp_mode='double_backward' (forward-over-reverse "
                "cannot reuse a graph: every product pushes a new tangent through the forward)"
            )
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized()
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise ArgumentError("distributed=True but no torch.distributed process group is initialised")
        named = trainable_parameters(model)
        self.model, self.loss_fn = model, loss_fn
        self.batches = as_batches(data)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.n = sum(self.sizes)
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.distributed, self.group = bool(distributed), process_group
        self.rank = dist.get_rank(process_group) if self.distributed else 0
        local = sum(batch_size(b) for b in self.batches)
        self.num_samples = int(
            self.all_reduce(torch.tensor([float(local)], dtype=torch.float64, device=self._comm_device())).item()
        )
        self.weights = [batch_size(b) / self.num_samples for b in self.batches]
        self.seed = self.broadcast_seed(seed)  # rank 0's; solvers seed their probe vectors with it
        # per-batch RNG seeds for train-mode randomness (dropout), decorrelated from self.seed
        self._rng_seeds = [
            (self.seed * 6364136223846793005 + 1442695040888963407 * (i + 1)) % 2**63 for i in range(len(self.batches))
        ]
        self.num_hvps = 0
        self._saved: Optional[Dict[str, Any]] = None
        self._use_torch_func = False  # forward_over_reverse: eager forward AD until an op lacks it
        self._losses: List[Tuple[int, torch.Tensor]] = []  # (batch, loss) since the last finiteness check
        # double_backward: the first-order graph (gradients with create_graph) of each batch is
        # built once and reused by every product, within a memory budget (see _graph_budget)
        self.cache_graph = (self.hvp_mode == "double_backward") if cache_graph is None else cache_graph
        self._cache_bytes_arg = cache_bytes
        self._cache_force = cache_graph is True
        self._graphs: Dict[int, Tuple[List[torch.Tensor], List[int]]] = {}
        self._cached_bytes = 0
        self._cache_full = False
        self.cache_budget: Optional[int] = None

    # ------------------------------------------------------------------ distributed helpers
    def _comm_device(self) -> torch.device:
        if self.distributed and dist.get_backend(self.group) == "nccl":
            return self.device
        return torch.device("cpu")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def broadcast_seed(self, seed: Optional[int], bits: int = 63) -> int:
        """Return ``seed`` (or a fresh random one), the same on every rank (rank 0's)."""
        if seed is None:
            seed = secrets.randbits(bits)
        if self.distributed:
            t = torch.tensor([int(seed) % 2**63], dtype=torch.int64, device=self._comm_device())
            dist.broadcast(t, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
            seed = int(t.item())
        return int(seed)

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision, so that every rank takes the same branch (no collective deadlock)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self._comm_device())
        dist.broadcast(t, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return bool(t.item())

    # ------------------------------------------------------------------ state save / restore
    def __enter__(self) -> HessianOperator:
        m = self.model
        self._saved = {
            "training": [(mod, mod.training) for mod in m.modules()],
            "buffers": [(b, b.detach().clone()) for b in m.buffers()],
            "grads": [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in m.parameters()],
            "bn": [],
        }
        m.train(self.model_mode == "train")
        return self

    def __exit__(self, *exc: Any) -> Literal[False]:
        self._graphs, self._cached_bytes, self._cache_full = {}, 0, False
        s, self._saved = self._saved, None
        assert s is not None  # entered
        with torch.no_grad():
            for b, saved in s["buffers"]:
                b.copy_(saved)
            for p, grad, saved in s["grads"]:
                p.grad = grad
                if grad is not None:
                    grad.copy_(saved)
        for mod, training in s["training"]:
            mod.training = training
        return False

    # ------------------------------------------------------------------ vectors
    def split(self, v: torch.Tensor) -> List[torch.Tensor]:
        return [c.view(s).to(self.dtype) for c, s in zip(v.split(self.sizes), self.shapes)]

    def from_params(self, vector: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """A parameter-shaped list/tuple (or flat tensor) of finite floats as a flat tensor on the device."""
        if isinstance(vector, torch.Tensor):
            if vector.dim() != 1 or vector.numel() != self.n:
                raise ArgumentError(
                    f"vector must be a flat tensor with {self.n} entries or a list shaped "
                    f"like the trainable parameters, got a tensor of shape {tuple(vector.shape)}"
                )
            flat = vector.to(self.device)
        else:
            if not isinstance(vector, (list, tuple)) or len(vector) != len(self.params):
                raise ArgumentError(
                    f"vector must be a list of {len(self.params)} tensors shaped like the "
                    f"trainable parameters (or a flat tensor with {self.n} entries)"
                )
            for i, (v, p) in enumerate(zip(vector, self.params)):
                if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                    raise ArgumentError(
                        f"vector[{i}] must have shape {tuple(p.shape)} (parameter {self.names[i]!r}),"
                        f" got {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
                    )
            flat = flatten(v.to(self.device) for v in vector)
        if not flat.is_floating_point() or not bool(torch.isfinite(flat).all()):
            raise ArgumentError(
                f"vector must hold finite floating-point numbers, got dtype {flat.dtype}"
                f"{'' if not flat.is_floating_point() else ' with NaN or infinite entries'}"
            )
        return flat

    # ------------------------------------------------------------------ products
    def _loss(self, i: int, outputs: Any, targets: Any) -> torch.Tensor:
        """loss_fn's scalar on batch ``i``, noted for the finiteness check of the product."""
        loss = _scalar_loss(self.loss_fn(outputs, targets))
        self._losses.append((i, loss.detach()))
        return loss

    def _seeded(self, i: int) -> Union[_NullCtx, _SeededRng]:
        if self.model_mode != "train":
            return _NullCtx()
        devices = [self.device] if self.device.type == "cuda" else []
        return _SeededRng(self._rng_seeds[i], devices)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H @ v for a flat vector ``v`` (length ``n``); the result has ``v``'s dtype.

        Raises ``FloatingPointError`` (the model's state is restored when the ``with`` block
        exits) when ``loss_fn`` is not finite on some batch or the product is not finite."""
        if self._saved is None:
            raise RuntimeError("HessianOperator.matvec must be called inside its `with` block")
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() != 1 or v.numel() != self.n:
            raise ArgumentError(f"v must be a flat floating-point tensor with {self.n} entries, got {_describe(v)}")
        vs = self.split(v.to(self.device))
        out = [torch.zeros_like(p) for p in self.params]
        fn = self._hvp_double_backward if self.hvp_mode == "double_backward" else self._hvp_fwd_rev
        self._losses = []
        for i, (batch, w) in enumerate(zip(self.batches, self.weights)):
            if self.cache_graph and (i in self._graphs or not self._cache_full):
                hv = self._hvp_cached(i, batch, vs)
                for o, h in zip(out, hv):
                    if h is not None:
                        o.add_(h.detach(), alpha=w)
                continue
            inputs, targets = _to(batch[0], self.device), _to(batch[1], self.device)
            try:
                with self._seeded(i):
                    hv = fn(i, inputs, targets, vs)
            except NotImplementedError:
                # an op without a forward-AD formula for its backward: use torch.func, whose jvp
                # decomposes such ops, for this and every later product (same seed, same masks)
                if fn != self._hvp_fwd_rev or self._use_torch_func:
                    raise
                self._use_torch_func = True
                self._losses = [(j, loss) for j, loss in self._losses if j != i]
                with self._seeded(i):
                    hv = fn(i, inputs, targets, vs)
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h.detach(), alpha=w)
        # the count of non-finite losses travels with the product's all-reduce, so every rank
        # reads the same verdict (one host read per product; the solvers read one anyway)
        bad = torch.zeros(1, dtype=out[0].dtype, device=self.device)
        for _, loss in self._losses:
            bad += (~torch.isfinite(loss)).to(bad.dtype)
        flat = self.all_reduce(flatten([*out, bad]))
        bad_losses, bad_product = torch.stack([flat[-1] > 0, ~torch.isfinite(flat[:-1]).all()]).tolist()
        if bad_losses or bad_product:
            self._raise_nonfinite(v, bad_losses)
        self.num_hvps += 1
        return flat[:-1].to(v.dtype)

    def _raise_nonfinite(self, v: torch.Tensor, bad_losses: bool) -> None:
        if bad_losses:
            local = [(i, float(loss)) for i, loss in self._losses if not bool(torch.isfinite(loss))]
            where = ", ".join(f"data batch {i} (loss {x})" for i, x in local) or "another rank's data"
            raise FloatingPointError(
                f"loss_fn is not finite on {where}{f' of rank {self.rank}' if self.distributed and local else ''}: "
                "the Hessian is undefined there (check the data, the model's weights and loss_fn)"
            )
        if not bool(torch.isfinite(v).all()):
            raise ArgumentError("v must be finite: it has NaN or infinite entries")
        raise FloatingPointError(
            "the Hessian-vector product is not finite although every loss is: the second derivative is "
            f"infinite at these weights (a point such as sqrt(0)) or overflows in {self.dtype} (try float64)"
        )

    # ------------------------------------------------------------------ graph reuse
    @property
    def num_cached(self) -> int:
        """How many batches' first-order graphs are kept for reuse."""
        return len(self._graphs)

    def _graph_budget(self) -> int:
        if self._cache_bytes_arg is not None:
            return self._cache_bytes_arg
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free // 2)
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024 // 4
        except OSError:
            pass
        return 1 << 30  # 1 GiB when the available memory is unknown

    def _first_order_graph(self, i: int, batch: Tuple[Any, Any]) -> Tuple[List[torch.Tensor], List[int], int]:
        """(gradients with their graph, the matching parameter indices, bytes the graph saves)."""
        inputs, targets = _to(batch[0], self.device), _to(batch[1], self.device)
        skip = {p.untyped_storage().data_ptr() for p in self.params}
        seen: set = set()
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in seen and ptr not in skip:
                    seen.add(ptr)
                    total[0] += st.nbytes()
            except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
                pass
            # detached: a saved output that held its own grad_fn would be a reference cycle through
            # C++ that gc cannot break (pytorch/pytorch#115255); unpacking restores the grad_fn
            return t.detach()

        with torch.enable_grad(), self._seeded(i), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self._loss(i, _call(self.model, inputs), targets)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        keep = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
        return [grads[j] for j in keep], keep, total[0]

    def _hvp_cached(self, i: int, batch: Tuple[Any, Any], vs: List[torch.Tensor]) -> Products:
        entry = self._graphs.get(i)
        if entry is None:
            grads, keep, nbytes = self._first_order_graph(i, batch)
            if self.cache_budget is None:
                self.cache_budget = self._graph_budget()
            fits = self._cache_force or self._cached_bytes + nbytes <= self.cache_budget
            entry = (grads, keep)
            if fits:
                self._graphs[i] = entry
                self._cached_bytes += nbytes
            else:  # over budget: this batch and every later uncached one are recomputed per product
                self._cache_full = True
        grads, keep = entry
        if not keep:  # the loss is at most linear in the parameters
            return [None] * len(vs)
        # d/dw (sum_j g_j . v_j) = H v: one backward through the kept first-order graph
        return torch.autograd.grad(
            grads, self.params, grad_outputs=[vs[j] for j in keep], retain_graph=i in self._graphs, allow_unused=True
        )

    def _hvp_double_backward(self, i: int, inputs: Any, targets: Any, vs: List[torch.Tensor]) -> Products:
        with torch.enable_grad():
            loss = self._loss(i, _call(self.model, inputs), targets)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            terms = [(g * v).sum() for g, v in zip(grads, vs) if g is not None and g.requires_grad]
            if not terms:  # the loss is at most linear in the parameters
                return [None] * len(vs)
            return torch.autograd.grad(torch.stack(terms).sum(), self.params, allow_unused=True)

    def _hvp_fwd_rev(self, i: int, inputs: Any, targets: Any, vs: List[torch.Tensor]) -> Products:
        if self._use_torch_func:
            return self._hvp_fwd_rev_func(i, inputs, targets, vs)
        return self._hvp_fwd_rev_eager(i, inputs, targets, vs)

    def _hvp_fwd_rev_eager(self, i: int, inputs: Any, targets: Any, vs: List[torch.Tensor]) -> Products:
        """Forward-over-reverse with eager forward AD: parameters as dual tensors (tangent = v),
        one forward, one plain backward (no ``create_graph``); the gradients' tangents are H v.

        Unlike ``jvp(grad(f))`` (``torch.func.grad`` always differentiates with
        ``create_graph=True``), nothing records a graph of the backward pass, so the saved
        tensors of the backward nodes are not kept alive until the product ends.
        """
        import torch.autograd.forward_ad as fwAD
        from torch.func import functional_call

        args, kwargs = _call_args(inputs)
        primals = [p.detach().requires_grad_() for p in self.params]
        with torch.enable_grad(), fwAD.dual_level():
            duals = {n: fwAD.make_dual(p, t) for n, p, t in zip(self.names, primals, vs)}
            out = functional_call(self.model, duals, args, kwargs, strict=False)
            loss = self._loss(i, out, targets)
            del out, duals
            grads = torch.autograd.grad(loss, primals, allow_unused=True)
            del loss
            return [None if g is None else fwAD.unpack_dual(g).tangent for g in grads]

    def _hvp_fwd_rev_func(self, i: int, inputs: Any, targets: Any, vs: List[torch.Tensor]) -> Products:
        from torch.func import functional_call, grad, jvp

        model = self.model
        primals = {n: p.detach() for n, p in zip(self.names, self.params)}
        tangents = dict(zip(self.names, vs))
        trainable = set(self.names)
        others = {n: p.detach() for n, p in model.named_parameters() if n not in trainable}
        others.update(dict(model.named_buffers()))

        args, kwargs = _call_args(inputs)

        def loss_of(p: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
            loss = _scalar_loss(self.loss_fn(functional_call(model, (p, others), args, kwargs), targets))
            return loss, loss.detach()  # the loss leaves the transforms as jvp's aux output

        # torch.func cannot mutate captured buffers: in train mode BatchNorm uses batch statistics
        # either way, so stop it from updating running statistics during the transform.
        bns = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
        ]
        for m in bns:
            m.track_running_stats = False
        try:
            # has_aux=True: (output, the product, aux); torch annotates the 2- and 3-tuple forms as one union
            _, hv, loss = cast(
                Tuple[Any, Any, Any], jvp(grad(loss_of, has_aux=True), (primals,), (tangents,), has_aux=True)
            )
            self._losses.append((i, loss))
        finally:
            for m in bns:
                m.track_running_stats = True
        return [hv[n] for n in self.names]


def _scalar_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            "loss_fn must return a scalar tensor (mean reduction), got "
            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}"
        )
    return loss.reshape(())


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)} and dtype {v.dtype}"
    return type(v).__name__


class _NullCtx:
    def __enter__(self) -> _NullCtx:
        return self

    def __exit__(self, *exc: Any) -> Literal[False]:
        return False


class _SeededRng:
    """Run a block with the CPU (and given CUDA devices') RNG seeded, then restore the RNG state."""

    def __init__(self, seed: int, devices: List[torch.device]) -> None:
        self.seed, self.devices = seed, devices

    def __enter__(self) -> _SeededRng:
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.default_generator.manual_seed(self.seed)
        for d in self.devices:
            torch.cuda.default_generators[d.index if d.index is not None else torch.cuda.current_device()].manual_seed(
                self.seed
            )
        return self

    def __exit__(self, *exc: Any) -> Optional[bool]:
        return self._fork.__exit__(*exc)


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    vector: Union[torch.Tensor, Sequence[torch.Tensor]],
    *,
    hvp_mode: str = "double_backward",
    model_mode: str = "eval",
    distributed: Optional[bool] = None,
    process_group: Any = None,
    seed: Optional[int] = None,
) -> List[torch.Tensor]:
    """One Hessian-vector product H @ vector of the sample-averaged loss.

    ``vector`` is a list shaped like the model's trainable parameters (``requires_grad=True``, in
    ``named_parameters()`` order) or a flat tensor of their total size. Returns a list of tensors
    shaped like those parameters (parameter dtype, model device). Model mode, buffers and
    ``.grad`` are restored afterwards. ``seed`` fixes train-mode dropout masks (see
    :class:`HessianOperator`).
    """
    # one product: nothing to reuse, so no graph is kept (memory as for a plain double backward)
    with HessianOperator(
        model,
        loss_fn,
        data,
        hvp_mode=hvp_mode,
        model_mode=model_mode,
        distributed=distributed,
        process_group=process_group,
        seed=seed,
        cache_graph=False,
    ) as op:
        flat = op.from_params(vector).to(op.dtype)
        return [t.view(s) for t, s in zip(op.matvec(flat).split(op.sizes), op.shapes)]
