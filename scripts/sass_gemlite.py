"""gemlite's int4 kernels (the `gemlite` package) as `scripts/kernel_sass.py` cases, compiled the same way
as lowbit's for the comparison rows; nothing when gemlite is not installed."""

from __future__ import annotations

import torch
from sass_tools import Case


def import_gemlite():
    """gemlite's GEMV module, or None when gemlite is not installed. Importing it asks the CUDA driver
    for the GPU; on a CPU machine an sm_90 GPU is stood in for the import only."""
    import importlib.util
    import types

    if importlib.util.find_spec("gemlite") is None:
        return None
    import triton.runtime as rt
    from triton.backends.compiler import GPUTarget

    class Hopper:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    saved = torch.cuda.get_device_capability, torch.cuda.get_device_properties
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        major=9, minor=0, name="H100", multi_processor_count=132
    )
    rt.driver.set_active(Hopper())
    try:
        from gemlite.triton_kernels import gemm_splitK_kernels, gemv_revsplitK_kernels
    finally:
        torch.cuda.get_device_capability, torch.cuda.get_device_properties = saved
        rt.driver._active = None
    return gemv_revsplitK_kernels, gemm_splitK_kernels


def gemlite_cases() -> list[Case]:
    """gemlite's int4 g128 GEMV for M = 1 (its reverse split-K kernel, asymmetric: (W - z) * s) in the
    configuration its H100 table picks for 4096 x 4096 and in its other table entries. It has no loop
    (each program reads two K blocks), so its whole program is counted: weights = BLOCK_N * 2 BLOCK_K."""
    modules = import_gemlite()
    if modules is None:
        return []
    g, gemm = modules
    n = k = 4096
    pointers = dict(a_ptr="*bf16", b_ptr="*i32", c_ptr="*fp32", scales_ptr="*bf16", zeros_ptr="*bf16")
    out = []
    configs = ((128, 8, 1, 1), (256, 8, 2, 1), (512, 8, 4, 2), (128, 32, 1, 1), (256, 64, 2, 2))
    for bn, bk, warps, stages in configs:
        consts = dict(
            N=n,
            K=k,
            W_nbits=4,
            group_size=128,
            unpack_mask=15,
            elements_per_sample=8,
            type_id=104,
            use_prehook=False,
            stride_am=k,
            stride_ak=1,
            stride_bk=n,
            stride_bn=1,
            stride_cm=n,
            stride_cn=1,
            stride_meta_a_m=0,
            stride_meta_a_g=0,
            stride_meta_g=n,
            stride_meta_n=1,
            input_dtype=tl_dtype("bfloat16"),
            output_dtype=tl_dtype("float32"),
            acc_dtype=tl_dtype("float32"),
            meta_dtype=tl_dtype("bfloat16"),
            channel_scale_mode=0,
            W_group_mode=3,
            zero_is_scalar=False,
            BLOCK_SIZE_M=1,
            BLOCK_SIZE_N=bn,
            BLOCK_SIZE_K=bk,
            A_load_order=0,
            dot_prod_mode=0,
            data_contiguous=True,
            EVEN_K=True,
            EVEN_N=True,
            scales_a_ptr=None,
            dump_b_val=0,
            meta_evict_policy="",
            atomic_mode="relaxed",
            a_evict="evict_last",
            b_evict="evict_first",
            block_quant_size=g.BLOCK_QUANT_SIZE,
        )
        name = f"N={bn},K={bk},w={warps},s={stages}"
        fn = g.gemv_INT_revsplitK_kernel.fn
        weights = bn * 2 * bk
        out.append(
            Case("gemlite-gemv", "int4-g128", "1", name, fn, consts, pointers, warps, stages, weights, True)
        )
    return out + gemlite_gemm_cases(gemm)


def gemlite_gemm_cases(gemm) -> list[Case]:
    """gemlite's int4 g128 split-K GEMM (`gemm_splitK_INT_kernel`, asymmetric) at M = 16, 32, 64 in the
    configurations of its H100 table for 4096 x 4096 (`GEMM_SPLITK`, keys (M, 4096, 4096, 128, 8, 104)).
    Its K loop is counted, over BLOCK_N * BLOCK_K weights an iteration."""
    n = k = 4096
    pointers = dict(a_ptr="*bf16", b_ptr="*i32", c_ptr="*bf16", scales_ptr="*bf16", zeros_ptr="*bf16")
    out = []
    for m, (bm, bn, bk, split, order) in {16: (16, 64, 64, 16, 0), 32: (32, 64, 64, 8, 2),
                                          64: (64, 64, 64, 8, 0)}.items():  # fmt: skip
        consts = dict(
            N=n,
            K=k,
            W_nbits=4,
            group_size=128,
            unpack_mask=15,
            elements_per_sample=8,
            type_id=104,
            a_sizeof=2,
            b_sizeof=4,
            load_scales_as_block=False,
            input_dtype=tl_dtype("bfloat16"),
            output_dtype=tl_dtype("bfloat16"),
            acc_dtype=tl_dtype("float32"),
            meta_dtype=tl_dtype("bfloat16"),
            channel_scale_mode=0,
            W_group_mode=3,
            zero_is_scalar=False,
            BLOCK_SIZE_M=bm,
            BLOCK_SIZE_N=bn,
            BLOCK_SIZE_K=bk,
            GROUP_SIZE_M=8,
            SPLIT_K=split,
            NUM_STAGES=1,
            A_load_order=order,
            data_contiguous=True,
            EVEN_M=False,
            EVEN_K=True,
            EVEN_N=True,
            scales_a_ptr=None,
            meta_scale_norm_ptr=None,
            use_tma=False,
            use_5d_scales=False,
            warp_specialize=False,
            meta_evict_policy="",
            atomic_mode="relaxed",
            a_evict="evict_last",
            b_evict="evict_first",
            block_quant_size=gemm.BLOCK_QUANT_SIZE,
        )
        name = f"M={bm},N={bn},K={bk},SPLIT_K={split},w=4,s=1"
        out.append(
            Case(
                "gemlite-gemm",
                "int4-g128",
                str(m),
                name,
                gemm.gemm_splitK_INT_kernel.fn.fn,
                consts,
                pointers,
                4,
                1,
                bn * bk,
            )
        )
    return out


def tl_dtype(name: str):
    import triton.language as tl

    return getattr(tl, name)
