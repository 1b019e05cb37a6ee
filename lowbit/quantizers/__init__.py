"""Weight formats: specs, round-to-nearest quantize / dequantize, bit packing and exact storage cost.

Formats (FORMATS): int2/3/4/8 (symmetric or asymmetric), nf2/3/4 (NormalFloat), fp8_e4m3, fp8_e5m2 and
fp4_e2m1, each group-wise (group_size) or per-channel, with scales in fp16/bf16/fp32 or
double-quantized. Each format names its family (`Family`: integer, NormalFloat, minifloat), which
describes the format once for quantization, layout, cost, fake quantization and the kernels. A
quantized matrix is a QTensor (packed codes + scales + the family's side parameters + spec).
"""

from lowbit.quantizers.cost import bits_per_weight, storage_bits
from lowbit.quantizers.family import Family, Side
from lowbit.quantizers.gptq import GPTQError, gptq
from lowbit.quantizers.groups import (
    DQ_BLOCK,
    SCALE_DTYPES,
    effective_group_size,
    expand_groups,
    from_group_view,
    group_absmax,
    group_minmax,
    group_reduce,
    group_view,
    round_scales,
)
from lowbit.quantizers.layout import stored_layout
from lowbit.quantizers.packing import pack, packed_row_bytes, unpack
from lowbit.quantizers.qtensor import TENSOR_FIELDS, QTensor
from lowbit.quantizers.quantize import (
    check_side,
    codebook,
    decode,
    decode_scales,
    dequantize,
    encode,
    fit_scales,
    pack_qtensor,
    pack_side,
    quantize,
    unpack_codes,
)
from lowbit.quantizers.spec import FORMATS, FormatInfo, QuantInputError, QuantSpec, SpecError

__all__ = [
    "DQ_BLOCK",
    "FORMATS",
    "SCALE_DTYPES",
    "TENSOR_FIELDS",
    "Family",
    "FormatInfo",
    "GPTQError",
    "QTensor",
    "QuantInputError",
    "QuantSpec",
    "SpecError",
    "Side",
    "bits_per_weight",
    "check_side",
    "codebook",
    "decode",
    "decode_scales",
    "dequantize",
    "effective_group_size",
    "encode",
    "expand_groups",
    "fit_scales",
    "gptq",
    "from_group_view",
    "group_absmax",
    "group_minmax",
    "group_reduce",
    "group_view",
    "pack",
    "pack_qtensor",
    "pack_side",
    "packed_row_bytes",
    "quantize",
    "round_scales",
    "storage_bits",
    "stored_layout",
    "unpack",
    "unpack_codes",
]
