"""The one-launch kernel of every format without the decode layout (`triton_fused`) against the
reference, under Triton's interpreter (in a fresh process when TRITON_INTERPRET=1 did not take effect
here, see test_kernels_triton)."""

import pytest
import torch

from tests.kernels.test_kernels_triton import (
    TOL,
    K,
    N,
    make_case,
    relative_error,
    run_in_a_fresh_process,
    skip_without_the_interpreter,
)

triton = pytest.importorskip("triton")

from lowbit.kernels import prepared, triton_fused, triton_splitk  # noqa: E402
from lowbit.kernels.trace import count_launches  # noqa: E402
from lowbit.quantizers import QuantSpec  # noqa: E402


@pytest.fixture(autouse=True)
def _needs_the_interpreter(request):
    skip_without_the_interpreter(request, {"test_in_a_fresh_process"})


def test_in_a_fresh_process():
    run_in_a_fresh_process(__file__)


def case_id(v) -> str:
    return v.short() if isinstance(v, QuantSpec) else str(v).replace("torch.", "")


CASES = [  # (spec, dtype, M, rank, smooth, bias): N = 83, K = 597 (ragged last group and K tile)
    (QuantSpec("int3", 128), torch.bfloat16, 1, 0, False, False),
    (QuantSpec("int3", 48, symmetric=True), torch.float16, 5, 4, True, True),
    (QuantSpec("int2", 64), torch.float16, 16, 8, False, True),
    (QuantSpec("int8", None), torch.float32, 3, 4, True, False),
    (QuantSpec("int4", 40, symmetric=True, scale_dtype="bfloat16"), torch.bfloat16, 33, 4, True, True),
    (QuantSpec("nf3", 128, double_quant=True), torch.float32, 7, 0, False, True),
    (QuantSpec("fp8_e4m3", 128), torch.bfloat16, 2, 0, True, False),
    (QuantSpec("fp8_e5m2", 64, scale_dtype="bfloat16"), torch.float16, 1, 70, False, False),
    (QuantSpec("fp4_e2m1", 32), torch.float16, 70, 8, True, True),  # two row tiles, split K
]


@pytest.mark.parametrize("spec, dtype, m, rank, smooth, bias", CASES, ids=case_id)
def test_fused_kernel_matches_the_reference(spec, dtype, m, rank, smooth, bias):
    """Within the Triton paths' bound, output poisoned before the call; the scratch is left zeroed."""
    q, l1, l2, s, b = make_case(spec, rank, smooth, bias, dtype)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    inv = None if s is None else 1.0 / s.float()
    config = triton_fused.fused_config(m, N, K, triton_fused.block_k(q), rank, smooth, 4)
    out = torch.full((m, N), float("nan"), dtype=dtype)
    assert triton_fused.fused(x, q, l1, l2, inv, b, config, out=out) is out
    assert relative_error(out, x, q, l1, l2, s, b) <= TOL[dtype]
    ws, t, lock = triton_splitk.scratch(x.device, N)
    assert not ws.any() and not t.any() and not lock.any()


def test_block_k_keeps_a_tile_in_one_group():
    def tile(spec):
        return triton_fused.block_k(make_case(spec)[0])

    assert tile(QuantSpec("int3", 128)) == tile(QuantSpec("int8", None)) == tile(QuantSpec("int2", 64)) == 64
    assert tile(QuantSpec("fp4_e2m1", 32)) == 32 and tile(QuantSpec("int3", 96)) == 32
    assert tile(QuantSpec("int3", 48)) == 64  # a scale per column


@pytest.mark.parametrize("spec", [QuantSpec("int3", 128), QuantSpec("fp8_e4m3", None)], ids=case_id)
@pytest.mark.parametrize("m", [1, 16, 17])
def test_a_prepared_layer_of_any_format_launches_one_kernel(spec, m):
    """Low rank, smoothing, bias and the output cast in the same launch, at decode and batch rows."""
    q, *parts = make_case(spec, 4, True, True, torch.bfloat16)
    layer = prepared.Prepared(q, *parts)
    x = torch.randn(2, m, K).to(torch.bfloat16)  # any leading dims
    y = layer(x)  # first call: configuration, scratch
    assert relative_error(y.reshape(-1, N), x.reshape(-1, K), q, *parts) <= TOL[torch.bfloat16]
    assert count_launches(lambda: layer(x)) == 1


def test_ranks_above_the_kernels_take_the_torch_op_path():
    q, *parts = make_case(QuantSpec("int3", 128), triton_splitk.MAX_RANK + 2, False, True, torch.bfloat16)
    layer = prepared.Prepared(q, *parts)
    x = torch.randn(3, K).to(torch.bfloat16)
    assert relative_error(layer(x), x, q, *parts) <= TOL[torch.bfloat16]
    assert count_launches(lambda: layer(x)) > 1
