"""QLinear: the one quantized Linear module, W [N, K] ~ Q + L1 L2 with optional input smoothing.

Its state is exactly what a checkpoint stores for the layer: the QTensor's fields as persistent buffers
(`codes`, `scales`, `zeros`, `dq_absmax`, only those the spec uses), the low-rank factors `l1` [N, r]
and `l2` [r, K] and the `bias` [N] as parameters, and the SVDQuant smoothing vector `smooth` [K] as a
buffer. The forward pass is `lowbit.kernels.qlinear`, whose reference backend defines it:

    y = (x / smooth) @ dequantize(Q).T + ((x / smooth) @ l2.T) @ l1.T + bias

Layers are swapped in by fully qualified name (`set_submodule`, `replace_linears`); nothing patches a
module's forward. For fine-tuning, `FakeQuantLinear` is a QLinear's training form (differentiable
scales, LSQ / L4Q fake quantization); `QLinear.replace_weight` takes back what it learned.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.kernels.dispatch import resolve_backend
from lowbit.kernels.prepared import KernelCache, forward
from lowbit.quantizers import (
    DQ_BLOCK,
    SCALE_DTYPES,
    TENSOR_FIELDS,
    QTensor,
    QuantSpec,
    decode_scales,
    dequantize,
    fit_scales,
    pack_qtensor,
    packed_row_bytes,
    round_scales,
    unpack_codes,
)
from lowbit.quantizers.fake import (
    fake_quantize,
    lsq_grad_scale,
    peqa_dequantize,
    project_to_codes,
    requantize,
)

PLAN_KEYS = ("spec", "shape", "rank", "bias", "smooth")


class QLinearError(ValueError):
    """A quantized layer that does not fit its model or its parts (shapes, dtypes, names)."""


def stored_layout(spec: QuantSpec, out_features: int, in_features: int) -> dict[str, tuple]:
    """Shape and dtype of every stored QTensor field of W [N, K] under `spec`, by field name.

    codes [N, ceil(K / 8) * bits] uint8; scales [N, G] in the scale dtype (uint8 second-level codes
    under double quantization); zeros [N, G] uint8 (asymmetric INT only); dq_absmax
    [ceil(N * G / DQ_BLOCK)] float32 (double quantization only).
    """
    N, K = out_features, in_features
    G = spec.groups(K)
    layout = {"codes": ((N, packed_row_bytes(K, spec.bits)), torch.uint8)}
    layout["scales"] = ((N, G), torch.uint8 if spec.double_quant else SCALE_DTYPES[spec.scale_dtype])
    if spec.kind == "int" and not spec.symmetric:
        layout["zeros"] = ((N, G), torch.uint8)
    if spec.double_quant:
        layout["dq_absmax"] = ((-(-(N * G) // DQ_BLOCK),), torch.float32)
    return layout


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
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v <= 0:
                raise QLinearError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(rank, int) or rank < 0:
            raise QLinearError(f"rank must be a non-negative integer, got {rank!r}")
        resolve_backend(backend)
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.rank, self.backend = spec, rank, backend
        # inference-time kernel state (prepared layouts, configurations), rebuilt when a tensor changes
        self.kernel_cache = KernelCache()
        layout = stored_layout(spec, out_features, in_features)
        for field in TENSOR_FIELDS:
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
        if (l1 is None) != (l2 is None):
            raise QLinearError("give both low-rank factors l1 and l2, or neither")
        rank = 0 if l1 is None else l1.shape[-1]
        if l1 is not None and (tuple(l1.shape) != (N, rank) or tuple(l2.shape) != (rank, K)):
            raise QLinearError(
                f"low-rank factors {tuple(l1.shape)}, {tuple(l2.shape)} do not fit [{N}, r], [r, {K}]"
            )
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
        )
        for field, t in q.tensors().items():
            expected = m._buffers.get(field)
            if expected is None or t.shape != expected.shape or t.dtype != expected.dtype:
                want = "absent" if expected is None else f"{tuple(expected.shape)} {expected.dtype}"
                raise QLinearError(
                    f"QTensor field {field!r} is {tuple(t.shape)} {t.dtype}; {q.spec.short()} expects {want}"
                )
            m._buffers[field] = t.detach().to(device).contiguous()
        missing = set(stored_layout(q.spec, N, K)) - set(q.tensors())
        if missing:
            raise QLinearError(f"QTensor lacks field(s) {sorted(missing)} that {q.spec.short()} stores")
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
        return cls(K, N, spec, entry["rank"], entry["bias"], entry["smooth"], dtype, device, backend)

    def qtensor(self) -> QTensor:
        """The stored quantized weight as a QTensor (views of this module's buffers)."""
        return QTensor(
            codes=self.codes,
            scales=self.scales,
            zeros=self.zeros,
            dq_absmax=self.dq_absmax,
            spec=self.spec,
            shape=(self.out_features, self.in_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        q = self.qtensor()
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
        if (l1 is None) != (l2 is None):
            raise QLinearError("give both low-rank factors l1 and l2, or neither")
        rank = 0 if l1 is None else l1.shape[-1]
        if l1 is not None and (tuple(l1.shape) != (N, rank) or tuple(l2.shape) != (rank, K)):
            raise QLinearError(
                f"low-rank factors {tuple(l1.shape)}, {tuple(l2.shape)} do not fit [{N}, r], [r, {K}]"
            )
        layout = stored_layout(self.spec, N, K)
        tensors = q.tensors()
        if set(tensors) != set(layout):
            raise QLinearError(
                f"QTensor holds {sorted(tensors)}; {self.spec.short()} stores {sorted(layout)}"
            )
        for field, t in tensors.items():
            if (tuple(t.shape), t.dtype) != layout[field]:
                raise QLinearError(
                    f"QTensor field {field!r} is {tuple(t.shape)} {t.dtype}, not {layout[field]}"
                )
        device = self.codes.device
        for field, t in tensors.items():
            self._buffers[field] = t.detach().to(device).contiguous()
        self.rank = rank
        self.l1 = None if l1 is None else nn.Parameter(l1.detach().to(device).contiguous())
        self.l2 = None if l2 is None else nn.Parameter(l2.detach().to(device).contiguous())

    def layer_plan(self) -> dict:
        """The JSON-able per-layer entry of a checkpoint manifest."""
        return {
            "spec": self.spec.to_dict(),
            "shape": [self.out_features, self.in_features],
            "rank": self.rank,
            "bias": self.bias is not None,
            "smooth": self.smooth is not None,
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.short()}, "
            f"rank={self.rank}, bias={self.bias is not None}, smooth={self.smooth is not None}"
        )


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


TRAIN_MODES = ("peqa", "l4q", "lsq")
LATENTS = ("compressed", "original")
# latent "compressed": where moved weights stop, as a fraction of the way back from the cell's edge to the
# grid point (lsq: halfway, its frozen latent would flip back at the first step of the scales; l4q: on the
# edge, B A moves its latent anyway and starting nearer the original weight trains better)
LATENT_INSET = {"lsq": 0.5, "l4q": 0.0}


class FakeQuantLinear(nn.Module):
    """The training form of a QLinear: y = x_s @ W_hat.T (+ (x_s @ l2.T) @ l1.T) + bias, x_s = x / smooth.

    W_hat [N, K] is differentiable in what the mode trains (see `lowbit.quantizers.fake`):

    - peqa (PEQA, Kim et al. 2023): W_hat = s * q(codes, z); codes [N, K] and zeros frozen, the scales
      s [N, G] trained; the low-rank branch, if any, frozen.
    - l4q (L4Q, Jeon et al. 2024): W_hat = fake_quantize(W0 + B A, s, z); the latent W0 [N, K] frozen,
      A [r, K], B [N, r] (B = 0 at the start), s and z trained with LSQ; no low-rank branch: B A is
      merged into the codes on export, which leaves a rank-0 layer.
    - lsq (LSQ, Esser et al. 2020): W_hat = fake_quantize(R, s, z) plus the low-rank branch l1 l2, with
      R = W0 - L1 L2 (the residual at the start) frozen; s, z, l1 and l2 trained.

    W0 is the dense weight in the layer's smoothed domain, W diag(smooth), as the caller passes it (the
    original model's weight). With `latent` "compressed" training starts from the layer as compressed:
    the stored scales, and the latent moved into the rounding cells of the stored codes
    (`project_to_codes`; lsq: of R, l4q: of W0 - L1 L2, the factors then added back), so codes that are
    not round-to-nearest of W0 (GPTQ's) survive while the latent keeps where W0 lies inside each cell;
    for lsq, weights that had to move stop halfway from the cell's edge (LATENT_INSET), or the first
    small change of a scale would flip them back to round-to-nearest.
    With "original" the codes restart from round-to-nearest of the latent (L4Q's initialisation): against
    the stored scales (lsq) or against round-to-nearest scales of W0 (l4q). Without W0 the latent is the
    layer's reconstruction dequantize(Q) (+ L1 L2 for l4q), on the grid, where LSQ's gradient of the
    scales starts at zero. Trained tensors are fp32 parameters; frozen ones are buffers (W0 and R in
    `dtype`, codes as uint8).
    """

    def __init__(
        self,
        layer: QLinear,
        mode: str,
        W0: torch.Tensor | None = None,
        lora_rank: int = 16,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        latent: str = "compressed",
    ) -> None:
        super().__init__()
        if mode not in TRAIN_MODES:
            raise QLinearError(f"unknown training mode {mode!r}; choose one of {', '.join(TRAIN_MODES)}")
        if latent not in LATENTS:
            raise QLinearError(f"unknown latent {latent!r}; choose one of {', '.join(LATENTS)}")
        N, K = layer.out_features, layer.in_features
        if W0 is not None and tuple(W0.shape) != (N, K):
            raise QLinearError(f"dense weight has shape {tuple(W0.shape)}, the layer is {(N, K)}")
        self.in_features, self.out_features, self.spec, self.mode = K, N, layer.spec, mode
        self.factor_dtype = torch.float32 if layer.l1 is None else layer.l1.dtype
        self.g = lsq_grad_scale(layer.spec, K)
        device = layer.codes.device
        q = layer.qtensor()
        s, z = (None if t is None else t.clone() for t in decode_scales(q))  # float32 [N, G], own copies
        self.register_buffer("smooth", layer.smooth)
        self.bias = layer.bias
        self.lora_a = self.lora_b = None
        l1, l2 = layer.l1, layer.l2
        if mode == "peqa":
            self.register_buffer("codes", unpack_codes(q))
            self.register_buffer("z", z)
            self.register_buffer("l1", None if l1 is None else l1.detach())
            self.register_buffer("l2", None if l2 is None else l2.detach())
            self.s = nn.Parameter(s)
            return
        lowrank = None if l1 is None else l1.detach().float() @ l2.detach().float()  # [N, K]
        restart = latent == "original" and W0 is not None
        if W0 is None:
            W0 = dequantize(q)
        else:
            W0 = W0.to(device, torch.float32) - (0 if lowrank is None else lowrank)
            if latent == "compressed":
                W0 = project_to_codes(W0, unpack_codes(q), s, z, layer.spec, dtype, LATENT_INSET[mode])
        if mode == "l4q" and lowrank is not None:
            W0 = W0 + lowrank
        self.register_buffer("w0", W0.to(dtype).contiguous())
        if mode == "l4q":
            if restart:
                s, z = fit_scales(self.w0.float(), layer.spec)
            bound = 1 / math.sqrt(K)  # LoRA's Kaiming-uniform A, zero B: training starts from W0
            a = (torch.rand(lora_rank, K, generator=generator) * 2 - 1) * bound
            self.lora_a = nn.Parameter(a.to(device))
            self.lora_b = nn.Parameter(torch.zeros(N, lora_rank, device=device))
            l1 = l2 = None
        self.s = nn.Parameter(s)
        self.z = None if z is None else nn.Parameter(z)
        self.l1 = None if l1 is None else nn.Parameter(l1.detach().float().clone())
        self.l2 = None if l2 is None else nn.Parameter(l2.detach().float().clone())

    def latent(self) -> torch.Tensor:
        """What is fake-quantized: W0 + B A (l4q) or R (lsq), float32 [N, K]."""
        w = self.w0.float()
        return w if self.lora_a is None else w + self.lora_b @ self.lora_a

    def weight(self) -> torch.Tensor:
        """W_hat float32 [N, K], the quantized part of the weight in the smoothed domain."""
        if self.mode == "peqa":
            return peqa_dequantize(self.codes, self.s, self.z, self.spec)
        return fake_quantize(self.latent(), self.s, self.z, self.spec, self.g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        dtype = x.dtype
        x_s = x if self.smooth is None else x / self.smooth.to(dtype)  # x_s: [..., K]
        y = x_s @ self.weight().to(dtype).T
        if self.l1 is not None:
            y = y + (x_s @ self.l2.to(dtype).T) @ self.l1.to(dtype).T
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y

    @torch.no_grad()
    def export(self) -> tuple[QTensor, torch.Tensor | None, torch.Tensor | None]:
        """(QTensor with the learned scales, l1, l2) for `QLinear.replace_weight`; l4q returns no factors.

        peqa keeps the codes (and zeros) bit-identical; l4q and lsq re-encode the latent against the
        learned scales, so the result computes exactly what this module computes.
        """
        if self.mode == "peqa":
            q = pack_qtensor(self.codes, round_scales(self.s.float(), self.spec), self.z, self.spec)
        else:
            q = requantize(self.latent(), self.s, self.z, self.spec)
        if self.l1 is None:
            return q, None, None
        return q, self.l1.to(self.factor_dtype), self.l2.to(self.factor_dtype)

    def extra_repr(self) -> str:
        lora = f", lora_rank={self.lora_a.shape[0]}" if self.lora_a is not None else ""
        rank = 0 if self.l1 is None else self.l1.shape[1]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.short()}, "
            f"mode={self.mode}, rank={rank}{lora}"
        )
