"""A quantized layer prepared once for inference: checks, kernel layouts and launch configurations at
load time (first call), a dictionary lookup and one launch per call.

`KernelCache` is what a layer (QLinear) keeps beside its tensors: `forward(cache, x, q, l1, l2, smooth,
bias, backend)` computes `lowbit.kernels.qlinear`'s function. Without gradients it goes around the
torch op:

- backend "triton" (resolved once per device and dtype): a `Prepared` weight, rebuilt only when a
  tensor of the layer is replaced (identity check); every row count runs one launch, a split-K kernel
  with a configuration cached per row bucket: `triton_decode` for 2/3/4/8-bit INT, NF4 and FP4 weights in
  bf16 or fp16 (`layout.supports`), `triton_fused` for every other format and dtype. From a measured
  crossover (none yet, see `triton_large`), dequantize + matmul instead; ranks above
  `triton_splitk.MAX_RANK` and x with a strided last dim take the GEMV / GEMM of `triton_qlinear`.
- backend "reference": the reference, with the dequantized weight kept between calls when the cache
  was made with `keep_dequantized=True` (speed over memory, for generation on a CPU).

With gradients enabled and a tensor that needs one, it calls `lowbit.kernels.qlinear` (the torch op
with its backward).
"""

from __future__ import annotations

import torch

from lowbit.kernels import reference
from lowbit.kernels.dispatch import qlinear, resolve_backend
from lowbit.quantizers import QTensor, dequantize


class Prepared:
    """The Triton kernels' form of one layer, for activations of any dtype the kernels take.

    Built from the layer's tensors, which it keeps (`matches` tells whether they are still the
    layer's); the inputs are checked here, once. Per activation dtype, on first use: the decode layout,
    the factors cast to that dtype; per row bucket, the launch configuration. A call picks the path
    by its row count M: a one-launch split-K kernel (`triton_decode` where the decode layout takes the
    weight, else `triton_fused`) below the format's measured crossover, dequantize + matmul (`triton_large`)
    from it; the GEMV / GEMM for ranks above MAX_RANK.
    """

    def __init__(self, q: QTensor, l1, l2, smooth, bias) -> None:
        from lowbit.kernels import triton_large, triton_splitk

        x = torch.empty((0, q.shape[1]), device=q.codes.device)
        reference.check_inputs(x, q, l1, l2, smooth, bias)  # once, at preparation
        self.q, self.l1, self.l2, self.smooth, self.bias = q, l1, l2, smooth, bias
        rank = 0 if l1 is None else l1.shape[1]
        self.rank = rank
        self.crossover = triton_large.crossover(q)
        self._parts = {}  # dtype -> (DecodeWeight or None, l1, l2, inv_smooth, bias)
        self._configs = {}  # (dtype, row bucket) -> split-K launch configuration
        self._rank_fits = rank <= triton_splitk.MAX_RANK
        self._sms = triton_splitk.multiprocessors(q.codes.device)
        self._hopper = triton_splitk.hopper_or_later(q.codes.device)

    def matches(self, codes, scales, l1, l2, smooth, bias) -> bool:
        """Whether these are the tensors this preparation was built from (same objects)."""
        q = self.q
        mine = (q.codes, q.scales, self.l1, self.l2, self.smooth, self.bias)
        return all(a is b for a, b in zip(mine, (codes, scales, l1, l2, smooth, bias), strict=True))

    def parts(self, dtype: torch.dtype) -> tuple:
        """(decode layout or None, l1, l2, 1 / smooth in float32, bias) for activations of `dtype`."""
        if dtype not in self._parts:
            from lowbit.kernels import layout

            cast = (None if t is None else t.to(dtype).contiguous() for t in (self.l1, self.l2, self.bias))
            l1, l2, bias = cast
            inv = None if self.smooth is None else 1.0 / self.smooth.to(dtype).float()
            fits = self._rank_fits and layout.supports(self.q, dtype)
            dw = layout.prepare_decode(self.q, dtype) if fits else None
            self._parts[dtype] = (dw, l1, l2, inv, bias)
        return self._parts[dtype]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """y [..., N] for x [..., K]: one launch (a split-K kernel) below a measured crossover, two (fold,
        GEMM) from it."""
        from lowbit.kernels import triton_large, triton_qlinear

        x2 = x.reshape(-1, x.shape[-1])
        M = x2.shape[0]
        if M == 0 or x.dtype not in triton_qlinear.DTYPES:
            return triton_qlinear.qlinear(x, self.q, self.l1, self.l2, self.smooth, self.bias)
        dw, l1, l2, inv, bias = self.parts(x.dtype)
        if self.crossover is not None and M >= self.crossover:
            y = triton_large.large(x2, self.q, l1, l2, inv, bias)
        elif self._rank_fits and x2.stride(-1) == 1:
            y = self._split_k(x2, dw, l1, l2, inv, bias)
        else:
            y = triton_qlinear.run(x2, self.q, self.l1, self.l2, self.smooth, self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _split_k(self, x2: torch.Tensor, dw, l1, l2, inv, bias) -> torch.Tensor:
        """The one-launch kernel: `triton_decode` where the decode layout takes the weight, else
        `triton_fused`, with the configuration of x2's row bucket."""
        from lowbit.kernels import triton_decode, triton_fused, triton_splitk

        key = (x2.dtype, triton_splitk.row_bucket(x2.shape[0]))
        config = self._configs.get(key)
        if config is None:
            (N, K), smooth = self.q.shape, self.smooth is not None
            if dw is not None:
                config = triton_decode.decode_config(key[1], N, K, dw.tile, dw.group_size, self.rank, smooth,
                                                     self._sms, dw.bits, self._hopper)  # fmt: skip
            else:
                tile = triton_fused.block_k(self.q)
                config = triton_fused.fused_config(key[1], N, K, tile, self.rank, smooth, self._sms)
            self._configs[key] = config
        if dw is not None:
            return triton_decode.decode(x2, dw, l1, l2, inv, bias, config)
        return triton_fused.fused(x2, self.q, l1, l2, inv, bias, config)


class KernelCache:
    """What a layer keeps for fast inference: the resolved backend per (device, dtype), the Triton
    preparation, and (keep_dequantized) the reference backend's dequantized weight."""

    def __init__(self, keep_dequantized: bool = False) -> None:
        self.keep_dequantized = keep_dequantized
        self.backends: dict = {}
        self.prepared: Prepared | None = None
        self.dequantized: tuple | None = None  # (codes, dtype, W)

    def __deepcopy__(self, memo) -> KernelCache:
        # a copied layer has its own tensors: it rebuilds what it needs, nothing is copied
        return KernelCache(self.keep_dequantized)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def forward(cache: KernelCache, x, q: QTensor, l1, l2, smooth, bias, backend: str = "auto") -> torch.Tensor:
    """`lowbit.kernels.qlinear(x, q, l1, l2, smooth, bias, backend)` with what `cache` keeps."""
    if _needs_grad(x, l1, l2, smooth, bias):
        return qlinear(x, q, l1, l2, smooth, bias, backend=backend)
    key = (x.device, x.dtype, backend)
    name = cache.backends.get(key)
    if name is None:
        name = cache.backends[key] = resolve_backend(backend, x.device, x.dtype, q.spec)
    if name == "triton":
        p = cache.prepared
        if p is None or not p.matches(q.codes, q.scales, l1, l2, smooth, bias):
            p = cache.prepared = Prepared(q, l1, l2, smooth, bias)
        return p(x)
    if name == "reference" and cache.keep_dequantized:
        d = cache.dequantized
        if d is None or d[0] is not q.codes or d[1] != x.dtype:
            d = cache.dequantized = (q.codes, x.dtype, dequantize(q, x.dtype))
        reference.check_inputs(x, q, l1, l2, smooth, bias)
        return reference.linear_dequantized(x, d[2], l1, l2, smooth, bias)
    return qlinear(x, q, l1, l2, smooth, bias, backend=name)


def keep_dequantized(model: torch.nn.Module, keep: bool = True) -> int:
    """Make every layer of `model` with a KernelCache (QLinear) keep its dequantized weight between
    reference-backend calls (speed over memory: one activation-dtype copy of each weight); returns how
    many layers. keep=False drops the copies."""
    caches = [getattr(m, "kernel_cache", None) for m in model.modules()]
    caches = [c for c in caches if isinstance(c, KernelCache)]
    for cache in caches:
        cache.keep_dequantized = keep
        cache.dequantized = None
    return len(caches)
