"""QLinear: the one quantized Linear module, W [N, K] ~ Q + L1 L2 with optional input smoothing.

Its state is exactly what a checkpoint stores for the layer: the QTensor's tensors as persistent buffers
(those `stored_layout` names: `codes`, `scales`, `zeros`, `dq_absmax`, a format family's own tensors),
the low-rank factors `l1` [N, r] and `l2` [r, K] and the `bias` [N] as parameters, and the SVDQuant
smoothing vector `smooth` [K] as a buffer. The forward pass is `lowbit.kernels.qlinear`, whose
reference backend defines it:

    y = (x / smooth) @ dequantize(Q).T + ((x / smooth) @ l2.T) @ l1.T + bias

A layer with `hadamard` set (QuaRot's online rotation, `lowbit.compress.rotation`) stores W R and first
multiplies its input by R, x <- x R (`lowbit.kernels.reference.hadamard_transform` defines it; the
Triton backends run `lowbit.kernels.triton_hadamard`); its plan entry then says "hadamard": true. A
float nn.Linear is given the same transform, before the layer is quantized, by `add_online_hadamard`,
which `from_linear` reads.

Layers are swapped in by fully qualified name (`set_submodule`, `replace_linears`); nothing patches a
module's forward. For fine-tuning, `FakeQuantLinear` is a QLinear's training form (differentiable
scales, LSQ / L4Q fake quantization); `QLinear.replace_weight` takes back what it learned.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels.dispatch import hadamard_transform, resolve_backend
from lowbit.kernels.prepared import KernelCache, forward
from lowbit.quantizers import TENSOR_FIELDS, QTensor, QuantSpec, stored_layout
from lowbit.quantizers.hadamard import online_orders
from lowbit.quantizers.spec import QuantInputError

PLAN_KEYS = ("spec", "shape", "rank", "bias", "smooth")
OPTIONAL_PLAN_KEYS = ("hadamard",)  # written only when true, so older checkpoints read as they were
ONLINE = "online_hadamard"  # the attribute `add_online_hadamard` sets on a float nn.Linear


class QLinearError(ValueError):
    """A quantized layer that does not fit its model or its parts (shapes, dtypes, names)."""


def _factor_rank(l1: torch.Tensor | None, l2: torch.Tensor | None, N: int, K: int) -> int:
    """The rank r of low-rank factors l1 [N, r], l2 [r, K] (0 for none), after checking their shapes."""
    if (l1 is None) != (l2 is None):
        raise QLinearError("give both low-rank factors l1 and l2, or neither")
    rank = 0 if l1 is None else l1.shape[-1]
    if l1 is not None and (tuple(l1.shape) != (N, rank) or tuple(l2.shape) != (rank, K)):
        shapes = f"{tuple(l1.shape)}, {tuple(l2.shape)}"
        raise QLinearError(f"low-rank factors {shapes} do not fit [{N}, r], [r, {K}]")
    return rank


def _stored_tensors(q: QTensor, spec: QuantSpec, N: int, K: int) -> dict[str, torch.Tensor]:
    """q's tensors by field, after checking they are exactly those `spec` stores for W [N, K]."""
    layout = stored_layout(spec, N, K)
    tensors = q.tensors()
    missing, unknown = sorted(set(layout) - set(tensors)), sorted(set(tensors) - set(layout))
    if missing or unknown:
        raise QLinearError(f"QTensor lacks field(s) {missing} / holds field(s) {unknown}; see {spec.short()}")
    for field, t in tensors.items():
        if (tuple(t.shape), t.dtype) != layout[field]:
            raise QLinearError(f"QTensor field {field!r} is {tuple(t.shape)} {t.dtype}, not {layout[field]}")
    return tensors


class QLinear(nn.Module):
    """A Linear layer whose weight is stored quantized (plus optional low-rank part and smoothing).

    in_features K, out_features N; rank r (0: no low-rank part); dtype: of l1, l2, smooth and bias.
    The constructor makes zero-filled tensors of the right shapes so a state dict can be loaded into
    it (on the meta device too, with `load_state_dict(..., assign=True)`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        rank: int = 0,
        has_bias: bool = False,
        has_smooth: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str = "auto",
        hadamard: bool = False,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v <= 0:
                raise QLinearError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(rank, int) or rank < 0:
            raise QLinearError(f"rank must be a non-negative integer, got {rank!r}")
        resolve_backend(backend)
        if hadamard:
            try:
                online_orders(in_features)
            except QuantInputError as e:
                raise QLinearError(f"online Hadamard transform: {e}") from None
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.rank, self.backend, self.hadamard = spec, rank, backend, hadamard
        # inference-time kernel state (prepared layouts, configurations), rebuilt when a tensor changes
        self.kernel_cache = KernelCache()
        layout = stored_layout(spec, out_features, in_features)
        self.extra_fields = tuple(f for f in layout if f not in TENSOR_FIELDS)  # a family's own tensors
        for field in (*TENSOR_FIELDS, *self.extra_fields):  # absent fixed fields stay None attributes
            t = None
            if field in layout:
                shape, field_dtype = layout[field]
                t = torch.zeros(shape, dtype=field_dtype, device=device)
            self.register_buffer(field, t)
        kw = dict(dtype=dtype, device=device)
        self.l1 = nn.Parameter(torch.zeros(out_features, rank, **kw)) if rank else None
        self.l2 = nn.Parameter(torch.zeros(rank, in_features, **kw)) if rank else None
        self.register_buffer("smooth", torch.ones(in_features, **kw) if has_smooth else None)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if has_bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        q: QTensor,
        l1: torch.Tensor | None = None,
        l2: torch.Tensor | None = None,
        smooth: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> QLinear:
        """The QLinear replacing `linear`: weight ~ Q + l1 l2 on input x / smooth, the linear's bias kept.

        Tensors keep their dtypes (cast l1, l2 and smooth beforehand if needed) and move to the device
        of the linear's weight.
        """
        N, K = linear.out_features, linear.in_features
        if tuple(q.shape) != (N, K):
            raise QLinearError(f"quantized weight has shape {tuple(q.shape)}, the linear layer is {(N, K)}")
        rank = _factor_rank(l1, l2, N, K)
        if smooth is not None and tuple(smooth.shape) != (K,):
            raise QLinearError(f"smoothing vector has shape {tuple(smooth.shape)}, expected ({K},)")
        device = linear.weight.device
        m = cls(
            K,
            N,
            q.spec,
            rank,
            linear.bias is not None,
            smooth is not None,
            linear.weight.dtype,
            "meta",
            backend,
            getattr(linear, ONLINE, False),
        )
        for field, t in _stored_tensors(q, q.spec, N, K).items():
            m._buffers[field] = t.detach().to(device).contiguous()
        if rank:
            # contiguous copies: the saved tensors are contiguous, and a strided view would take
            # another matmul path whose rounding differs from the reloaded model's
            m.l1 = nn.Parameter(l1.detach().to(device).contiguous())
            m.l2 = nn.Parameter(l2.detach().to(device).contiguous())
        if smooth is not None:
            m.smooth = smooth.detach().to(device).contiguous()
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone())
        return m

    @classmethod
    def from_plan(
        cls, entry: dict, dtype: torch.dtype, device: torch.device | str | None = None, backend: str = "auto"
    ) -> QLinear:
        """An empty QLinear for one per-layer plan entry (see `layer_plan`)."""
        N, K = entry["shape"]
        spec = QuantSpec.from_dict(entry["spec"])
        args = (entry["rank"], entry["bias"], entry["smooth"], dtype, device, backend)
        return cls(K, N, spec, *args, entry.get("hadamard", False))

    def qtensor(self) -> QTensor:
        """The stored quantized weight as a QTensor (views of this module's buffers)."""
        extra = {f: self._buffers[f] for f in self.extra_fields}
        shape = (self.out_features, self.in_features)
        return QTensor(self.codes, self.scales, self.zeros, self.dq_absmax, self.spec, shape, extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        q = self.qtensor()
        if self.hadamard:
            x = hadamard_transform(x, self.backend, self.spec)  # x R: [..., K]
        return forward(self.kernel_cache, x, q, self.l1, self.l2, self.smooth, self.bias, self.backend)

    def replace_weight(
        self, q: QTensor, l1: torch.Tensor | None = None, l2: torch.Tensor | None = None
    ) -> None:
        """Store a new quantized weight (same spec and shape) and low-rank factors (any rank; None: rank 0).

        Fine-tuning calls this when it changes codes, scales or the rank; tensors keep their dtypes and
        move to the device of the current codes.
        """
        N, K = self.out_features, self.in_features
        if q.spec != self.spec or tuple(q.shape) != (N, K):
            raise QLinearError(
                f"new weight is {q.spec.short()} {tuple(q.shape)}; the layer is {self.spec.short()} {(N, K)}"
            )
        rank = _factor_rank(l1, l2, N, K)
        tensors = _stored_tensors(q, self.spec, N, K)
        device = self.codes.device
        for field, t in tensors.items():
            self._buffers[field] = t.detach().to(device).contiguous()
        self.rank = rank
        self.l1 = None if l1 is None else nn.Parameter(l1.detach().to(device).contiguous())
        self.l2 = None if l2 is None else nn.Parameter(l2.detach().to(device).contiguous())

    def layer_plan(self) -> dict:
        """The JSON-able per-layer entry of a checkpoint manifest."""
        entry = {
            "spec": self.spec.to_dict(),
            "shape": [self.out_features, self.in_features],
            "rank": self.rank,
            "bias": self.bias is not None,
            "smooth": self.smooth is not None,
        }
        return {**entry, "hadamard": True} if self.hadamard else entry

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.short()}, "
            f"rank={self.rank}, bias={self.bias is not None}, smooth={self.smooth is not None}"
            + (", hadamard=True" if self.hadamard else "")
        )


def _rotate_input(module: nn.Module, args: tuple) -> tuple:
    return (hadamard_transform(args[0]), *args[1:])


def add_online_hadamard(linear: nn.Linear) -> None:
    """Make a float nn.Linear whose weight holds W R compute y = (x R) (W R)^T = x W^T: a forward pre-hook,
    first of its hooks so that calibration statistics see x R, and the attribute `from_linear` reads."""
    setattr(linear, ONLINE, True)
    linear.register_forward_pre_hook(_rotate_input, prepend=True)


def set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    """Replace the submodule at fully qualified name `fqn` (e.g. 'model.layers.0.mlp.up_proj')."""
    parent_name, _, child = fqn.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise QLinearError(f"model has no module {parent_name!r} (parent of {fqn!r})") from None
    if not child or child not in parent._modules:
        raise QLinearError(f"model has no module {fqn!r}")
    setattr(parent, child, module)


def replace_linears(
    model: nn.Module,
    plan: dict[str, dict],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> nn.Module:
    """Swap an empty QLinear in for every layer of `plan` (fqn -> entry); returns `model`.

    Each target must be an nn.Linear (or QLinear) of the entry's shape; dtype and device default to
    those of the layer being replaced.
    """
    for fqn, entry in plan.items():
        try:
            old = model.get_submodule(fqn)
        except AttributeError:
            raise QLinearError(f"layer {fqn!r} of the plan is not a module of the model") from None
        if not isinstance(old, (nn.Linear, QLinear)):
            raise QLinearError(f"layer {fqn!r} of the plan is a {type(old).__name__}, not a Linear")
        if [old.out_features, old.in_features] != list(entry["shape"]):
            shape = [old.out_features, old.in_features]
            raise QLinearError(f"layer {fqn!r} is {shape}, the plan says {list(entry['shape'])}")
        ref = old.weight if isinstance(old, nn.Linear) else old.codes
        layer_dtype = dtype or (ref.dtype if isinstance(old, nn.Linear) else torch.float32)
        set_submodule(model, fqn, QLinear.from_plan(entry, layer_dtype, device or ref.device, backend))
    return model
