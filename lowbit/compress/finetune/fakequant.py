"""FakeQuantLinear: a QLinear's training form, differentiable in what the fine-tuning mode trains.

PEQA (Kim et al. 2023) trains the scales of frozen codes; L4Q (Jeon et al. 2024) trains LoRA factors and
step sizes through the quantizer; LSQ (Esser et al. 2020) trains step sizes with the low-rank factors.
`FakeQuantLinear.export` gives back what was learned for `QLinear.replace_weight`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.kernels.reference import hadamard_transform
from lowbit.nn.qlinear import QLinear, QLinearError
from lowbit.quantizers import (
    QTensor,
    decode_scales,
    dequantize,
    fit_scales,
    pack_qtensor,
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

TRAIN_MODES = ("peqa", "l4q", "lsq")
LATENTS = ("compressed", "original")
# latent "compressed": where moved weights stop by default, as a fraction of the way back from the cell's
# edge to the grid point (FinetuneConfig.latent_inset overrides it). lsq: halfway, its frozen latent would
# flip back at the first step of the scales; l4q: on the edge, B A moves its latent anyway and starting
# nearer the original weight trains better on scaled weights (docs/benchmarks.md, "Fine-tuning the
# allocated model"); on rotated weights at 2.5 bits per weight the edge start threw GPTQ's codes back to
# round-to-nearest at the first step and halfway trains (alloc-rot-ft sets 0.5; "The default budget
# recipe").
LATENT_INSET = {"lsq": 0.5, "l4q": 0.0}


class FakeQuantLinear(nn.Module):
    """The training form of a QLinear: y = x_s @ W_hat.T (+ (x_s @ l2.T) @ l1.T) + bias, x_s = x / smooth,
    with x first rotated, x R, where the QLinear has an online Hadamard transform (QuaRot's online_down).

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
    weights that had to move stop `inset` of the way from the cell's edge to its grid point (None: the
    mode's LATENT_INSET; for lsq halfway, or the first small change of a scale would flip them back to
    round-to-nearest).
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
        inset: float | None = None,
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
        self.hadamard = layer.hadamard
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
                inset = LATENT_INSET[mode] if inset is None else inset
                W0 = project_to_codes(W0, unpack_codes(q), s, z, layer.spec, dtype, inset)
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
        if self.hadamard:
            x = hadamard_transform(x)  # x R, as the QLinear computes it (differentiable)
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
            f"mode={self.mode}, rank={rank}{lora}" + (", hadamard=True" if self.hadamard else "")
        )
