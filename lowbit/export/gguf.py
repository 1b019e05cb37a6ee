"""The GGUF export (llama.cpp) of a Llama-architecture checkpoint: `model.gguf` + `adapter.gguf`.

llama.cpp's legacy quant types cut every row into blocks of 32 weights with an fp16 scale d (and min m):

    Q8_0: w = d q,           q int8         <- symmetric INT8: q = c - 128, d = s
    Q4_0: w = d (q - 8),     q in 0..15     <- symmetric INT4: q = c, d = s
    Q4_1: w = d q + m,       q in 0..15     <- asymmetric INT4: q = c, d = s, m = -s z

A group of 32 j weights (g128: j = 4; per-channel: the whole row) is j blocks that repeat its s and z, so
any group size that is a multiple of 32 exports exactly, as g32 does. lowbit's K-quant formats q4_k, q5_k
and q6_k are written as Q4_K, Q5_K and Q6_K bit for bit (`lowbit.export.gguf_kquants`) where K % 256 == 0.

lowbit's INT grid is s (c - 2^(b-1)) symmetric and s (c - z) asymmetric, so Q8_0 and Q4_0 hold Q exactly
when its scales are fp16 (other scale dtypes are rounded to fp16), and Q4_1 up to the fp16 rounding of
m = -s z. Other specs (group sizes not a multiple of 32, NF, INT2/3, FP8/FP4, asymmetric INT8) and
smoothing that cannot be folded into a norm are refused, or with convert=True re-quantized to the nearest
of these types (`lowbit.export.fit`). Unquantized tensors are written in the export dtype (F32, F16 or
BF16), 1-D ones (norms) in F32 as llama.cpp expects, except the token embedding: by default ("auto") Q6_K
where its rows are a multiple of 256 and the file's main type is not Q8_0, else Q8_0, as llama-quantize
writes an embedding that doubles as the output projection (llama-quant.cpp); `embedding` chooses another
(EMBEDDING_TYPES). Rows of the q / k projections are permuted into
llama.cpp's rotary layout, as convert_hf_to_gguf.py does (readers undo it). The tokenizer goes into
the same file (`lowbit.export.gguf_tokenizer`).

The low-rank branch goes to `adapter.gguf`, a GGUF LoRA adapter laid out like llama.cpp's
convert_lora_to_gguf.py writes it: general.type "adapter", adapter.type "lora", adapter.lora.alpha, and per
layer `{tensor}.weight.lora_a` = L2 [r, K] and `.lora_b` = L1 [N, r] (GGUF lists dims reversed: ne = [K, r]
and [r, N]). llama.cpp scales a layer's branch by alpha / r (r read from lora_b), or by 1 when alpha is 0:
alpha is r when all layers share one rank, else 0, so every layer's scaling is 1.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import gguf
import torch
from torch import nn
from transformers.integrations.gguf.reader import read_gguf_metadata

from lowbit.export.files import dense_state
from lowbit.export.gguf_kquants import KQUANT_TYPES, kquant_blocks
from lowbit.export.gguf_tokenizer import add_tokenizer, check_tokenizer
from lowbit.export.target import ExportError, Target
from lowbit.models.errors import ModelError
from lowbit.models.gguf import gguf_tokenizer, load_gguf
from lowbit.nn.qlinear import QLinear
from lowbit.quantizers import QTensor, QuantSpec, decode_scales, quantize, unpack_codes
from lowbit.quantizers.engines import QK, llama_cpp_problem
from lowbit.quantizers.kquant import QK_K

MODEL_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"
Q = gguf.GGMLQuantizationType
GGUF_TYPES = {("int8", True): Q.Q8_0, ("int4", True): Q.Q4_0, ("int4", False): Q.Q4_1}
FILE_TYPES = {
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    Q.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
    Q.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
}
# the token embedding's type (`lowbit export --to gguf --embedding`): "auto" (see the module docstring), a
# quantized type (written with lowbit's round-to-nearest of that format) or a float type
EMBEDDING_TYPES = {
    "auto": None,
    "q8_0": QuantSpec("int8", QK, True),
    "q6_k": QuantSpec("q6_k"),
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
}
UNQUANTIZED = {Q.F32, Q.F16, Q.BF16, Q.F64, Q.I8, Q.I16, Q.I32, Q.I64}
FLOAT_TYPES = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}
DENSE_FILE_TYPES = {
    torch.float32: gguf.LlamaFileType.ALL_F32,
    torch.float16: gguf.LlamaFileType.MOSTLY_F16,
    torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16,
}


def gguf_problem(spec: QuantSpec, in_features: int) -> str | None:
    """Why no llama.cpp type holds Q of this spec as is, or None if Q8_0 / Q4_0 / Q4_1 does: llama.cpp's
    rules (`lowbit.quantizers.engines.llama_cpp_problem`), double-quantized scales decoded and rounded to
    fp16. A group of g = 32 j weights (or a whole row, per-channel) is j blocks of 32 sharing its scale
    and zero: llama.cpp holds it exactly by repeating them in each block (`block_scales`)."""
    return llama_cpp_problem(replace(spec, double_quant=False), in_features)


def block_scales(t: torch.Tensor, spec: QuantSpec, in_features: int) -> torch.Tensor:
    """Per-group values t [N, G] repeated onto llama.cpp's blocks of 32: [N, K / 32]; the last group of
    a row may be shorter (a ragged group size), so the repeat is cut at K / 32 blocks."""
    per_group = (spec.group_size or in_features) // QK
    return t.repeat_interleave(per_group, dim=1)[:, : in_features // QK]


def gguf_spec(spec: QuantSpec, in_features: int, dtype: torch.dtype) -> QuantSpec:
    """The nearest spec a llama.cpp type holds: 8-bit formats -> symmetric INT8 (Q8_0), everything else
    -> INT4 (Q4_0 symmetric, Q4_1 asymmetric), group 32, fp16 scales; `dtype` plays no part."""
    if in_features % QK:
        raise ExportError(f"in_features {in_features} is not a multiple of 32: no llama.cpp type can hold it")
    bits = 8 if spec.bits == 8 else 4
    return QuantSpec(f"int{bits}", QK, bits == 8 or spec.symmetric, "float16")


def gguf_blocks(q: QTensor) -> tuple[gguf.GGMLQuantizationType, torch.Tensor]:
    """(llama.cpp type, blocks uint8 [N, K / 32 * block bytes]) of an expressible Q."""
    if q.spec.format in KQUANT_TYPES:
        return kquant_blocks(q)
    qtype = GGUF_TYPES[(q.spec.format, q.spec.symmetric)]
    N, K = q.shape
    c = unpack_codes(q).view(N, K // QK, QK)  # [N, G, 32]
    s, z = decode_scales(q)  # [N, G] -> [N, K / 32]: each group's scale and zero in each of its blocks
    s = block_scales(s, q.spec, K)
    z = None if z is None else block_scales(z, q.spec, K)
    parts = [s.to(torch.float16).unsqueeze(-1).view(torch.uint8)]  # d: [N, K / 32, 2]
    if qtype == Q.Q8_0:
        parts.append((c.to(torch.int16) - 128).to(torch.int8).view(torch.uint8))
    else:
        if qtype == Q.Q4_1:
            parts.append((-s * z).to(torch.float16).unsqueeze(-1).view(torch.uint8))  # m
        parts.append(c[..., : QK // 2] | c[..., QK // 2 :] << 4)  # byte j: q_j | q_{j+16} << 4
    return qtype, torch.cat(parts, dim=-1).reshape(N, -1).contiguous()


def _gguf_weight(m: QLinear, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as llama.cpp decodes the blocks (gguf-py's reference dequantization), float32."""
    qtype, blocks = gguf_blocks(m.qtensor())
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype)).float()


def rope_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order [rows] of a q / k projection in llama.cpp: in each head, HF's rotate-half pairs (i, i + d/2)
    become adjacent (2i, 2i + 1); convert_hf_to_gguf.py's LlamaModel.permute. W_gguf = W[perm]."""
    return torch.arange(rows).view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def rope_heads(gguf_name: str, config) -> int | None:
    """The head count that permutes the rows of this GGUF tensor (q: attention heads, k: KV heads)."""
    if ".attn_q." in gguf_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_name:
        return config.num_key_value_heads
    return None


def tensor_names(config) -> gguf.TensorNameMap:
    """transformers module / tensor name -> GGUF tensor name for a Llama of this config."""
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)


def check_llama(config) -> None:
    """Refuse, in one line, what llama.cpp's `llama` architecture (as written here) does not compute."""
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default"}
    found = {
        f"model type {config.model_type!r}": config.model_type != "llama",
        f"rope type {rope.get('rope_type')!r}": rope.get("rope_type", "default") != "default",
        "attention biases": getattr(config, "attention_bias", False),
        "MLP biases": getattr(config, "mlp_bias", False),
        f"activation {getattr(config, 'hidden_act', None)!r}": getattr(config, "hidden_act", None) != "silu",
    }
    found = [what for what, bad in found.items() if bad]
    if found:
        raise ExportError(f"GGUF export writes plain Llama models only; this one has {', '.join(found)}")


def _typed(t: torch.Tensor) -> tuple[torch.Tensor, gguf.GGMLQuantizationType]:
    """(tensor to write, GGUF type) of an unquantized tensor; bfloat16 goes as its raw bytes (uint8)."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.uint8), Q.BF16
    return t, FLOAT_TYPES[t.dtype]


def embedding_tensor(E: torch.Tensor, choice: str, main, dtype: torch.dtype) -> tuple:
    """(tensor to write, GGUF type) of the token embedding E [vocab, hidden] as `choice` (EMBEDDING_TYPES)
    says; main: the file's most common quantized type (None: no quantized layer)."""
    if choice not in EMBEDDING_TYPES:
        raise ExportError(f"unknown embedding type {choice!r}; choose one of {', '.join(EMBEDDING_TYPES)}")
    hidden = E.shape[1]
    kind = EMBEDDING_TYPES[choice]
    if choice == "auto":
        if hidden % QK:
            return _typed(E.to(dtype))
        kind = EMBEDDING_TYPES["q6_k" if hidden % QK_K == 0 and main != Q.Q8_0 else "q8_0"]
    if isinstance(kind, torch.dtype):
        return _typed(E.to(kind))
    if hidden % kind.group_size:
        raise ExportError(
            f"embedding type {choice} needs a hidden size that is a multiple of {kind.group_size}"
        )
    qtype, blocks = gguf_blocks(quantize(E.float(), kind))
    return blocks, qtype


def _gguf_tensors(
    model: nn.Module, dtype: torch.dtype, embedding: str = "auto"
) -> tuple[dict[str, tuple], Counter]:
    """({GGUF name: (numpy data, GGUF type)} of the model file, {quant type: weights it holds})."""
    config, names = model.config, tensor_names(model.config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    items = {  # transformers name -> (tensor [rows, ...], GGUF type); norms (1-D) stay float32
        n: _typed(t if t.ndim == 1 else t.to(dtype))
        for n, t in dense_state(model, torch.float32, set(layers)).items()
    }
    counts: Counter = Counter()
    for n, m in layers.items():
        qtype, blocks = gguf_blocks(m.qtensor())
        items[f"{n}.weight"] = (blocks, qtype)
        counts[qtype] += m.out_features * m.in_features
    embed = next(f"{n}.weight" for n, e in model.named_modules() if e is model.get_input_embeddings())
    main = counts.most_common(1)[0][0] if counts else None
    items[embed] = embedding_tensor(model.get_input_embeddings().weight.detach(), embedding, main, dtype)
    gnames = {n: names.get_name(n, try_suffixes=(".weight", ".bias")) for n in items}
    unknown = [n for n, g in gnames.items() if g is None]
    if unknown:
        raise ExportError(f"no GGUF name for {len(unknown)} tensor(s): {', '.join(unknown[:10])}")
    out = {}
    for n, (t, qtype) in items.items():
        heads = rope_heads(gnames[n], config)
        if heads is not None:
            t = t[rope_permutation(t.shape[0], heads)]
        out[gnames[n]] = (t.contiguous().numpy(), qtype)
    return out, counts


def _llama_metadata(w: gguf.GGUFWriter, config, name: str, counts: Counter, dtype: torch.dtype) -> None:
    """The llama.* hyper-parameters llama.cpp and transformers read (convert_hf_to_gguf.py's keys)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(FILE_TYPES[counts.most_common(1)[0][0]] if counts else DENSE_FILE_TYPES[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_file(w: gguf.GGUFWriter, tensors: dict[str, tuple]) -> None:
    for gname, (data, qtype) in tensors.items():
        w.add_tensor(gname, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _adapter_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, tuple]:
    """{`{tensor}.weight.lora_a` / `.lora_b`: (data, type)}: L2 [r, K] and L1 [N, r], rows of L1 permuted
    like the base's for q / k."""
    names, out = tensor_names(model.config), {}
    for n, m in model.named_modules():
        if isinstance(m, QLinear) and m.rank:
            gname = names.get_name(f"{n}.weight", try_suffixes=(".weight",))
            heads = rope_heads(gname, model.config)
            l1 = m.l1.detach().to(dtype).cpu()  # [N, r]
            l1 = l1 if heads is None else l1[rope_permutation(l1.shape[0], heads)]
            for key, t in ((".lora_a", m.l2.detach().to(dtype).cpu()), (".lora_b", l1)):
                t, qtype = _typed(t)
                out[gname + key] = (t.contiguous().numpy(), qtype)
    return out


def write_gguf(
    model: nn.Module, tmp: Path, dtype: torch.dtype, tokenizer, name: str, embedding: str = "auto"
) -> None:
    """Write the prepared `model` (a Llama passing `check_llama`, every QLinear expressible) as
    `model.gguf` (+ `adapter.gguf`) in `tmp`, the token embedding as `embedding` says (EMBEDDING_TYPES)."""
    tensors, counts = _gguf_tensors(model, dtype, embedding)
    w = gguf.GGUFWriter(tmp / MODEL_FILE, "llama")
    _llama_metadata(w, model.config, name, counts, dtype)
    copied = add_tokenizer(w, tokenizer, model.config.vocab_size)
    _write_file(w, tensors)
    if not copied:
        check_tokenizer(tmp, MODEL_FILE, tokenizer)
    lora = _adapter_tensors(model, dtype)
    if lora:
        ranks = {data.shape[0] for gname, (data, _) in lora.items() if gname.endswith(".lora_a")}  # [r, K]
        w = gguf.GGUFWriter(tmp / ADAPTER_FILE, "llama")
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(ranks.pop()) if len(ranks) == 1 else 0.0)
        _write_file(w, lora)


def is_gguf_adapter(path: Path) -> bool:
    """Whether a .gguf file is an adapter (general.type "adapter"), read from its metadata only."""
    try:
        metadata, _ = read_gguf_metadata(str(path))
    except Exception:  # not readable as GGUF: let loading it as a model report why
        return False
    return metadata.get("general.type") == "adapter"


@torch.no_grad()
def _merge_gguf_adapter(net: torch.nn.Module, adapter: Path, model: str) -> torch.nn.Module:
    """Add a GGUF LoRA adapter (as `lowbit export --to gguf` writes it) to the dequantized weights:
    W += scale * lora_b @ lora_a with llama.cpp's scale (alpha / r, or 1 when alpha is 0), the rows of
    lora_b for q / k put back from llama.cpp's rotary order into transformers'."""
    reader = gguf.GGUFReader(adapter)
    field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(field.contents()) if field is not None else 0.0
    names = tensor_names(net.config)
    linears = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    layers = {names.get_name(f"{n}.weight", try_suffixes=(".weight",)): n for n in linears}
    tensors = {t.name: t for t in reader.tensors}
    for name in [n for n in tensors if n.endswith(".lora_a")]:
        base = name.removesuffix(".lora_a")
        if base not in layers or base + ".lora_b" not in tensors:
            raise ModelError(f"cannot apply the adapter {adapter.name} of {model!r}: no layer for {name}")
        A, B = (  # A: [r, K], B: [N, r]; copied out of the read-only memory map
            torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type))
            for t in (tensors[name], tensors[base + ".lora_b"])
        )
        heads = rope_heads(base, net.config)
        if heads is not None:
            B = B[torch.argsort(rope_permutation(B.shape[0], heads))]
        weight = net.get_submodule(layers[base]).weight  # [N, K] += [N, r] @ [r, K]
        scale = alpha / A.shape[0] if alpha else 1.0
        weight.add_((scale * B.float() @ A.float()).to(weight.dtype))
    return net


def _gguf_bits(files: list[Path]) -> float | None:
    tensors = {t.name: t for f in files for t in gguf.GGUFReader(f).tensors}
    lora = {n for n in tensors if n.endswith((".lora_a", ".lora_b"))}
    other = lora | {"token_embd.weight", "output.weight"}  # not linear layers of a lowbit checkpoint
    layers = {n for n, t in tensors.items() if t.tensor_type not in UNQUANTIZED and n not in other}
    if not layers:
        layers = {n for n, t in tensors.items() if len(t.shape) == 2 and n not in other}
    bits = sum(
        8 * int(t.n_bytes) for n, t in tensors.items() if n in layers or n.rpartition(".")[0] in layers
    )
    weights = sum(int(tensors[n].n_elements) for n in layers)
    return bits / weights if weights else None


def gguf_files(path: Path) -> tuple[Path, Path | None]:
    """(model file, adapter file or None) of a .gguf file or a folder holding one model and at most one
    adapter; ExportError otherwise."""
    if path.is_file():
        return path, None
    ggufs = sorted(path.glob("*.gguf"))
    adapters = [p for p in ggufs if is_gguf_adapter(p)] if len(ggufs) > 1 else []
    bases = [p for p in ggufs if p not in adapters]
    if len(bases) != 1 or len(adapters) > 1:
        names = ", ".join(p.name for p in ggufs) or "none"
        raise ExportError(f"{path} must hold one GGUF model and at most one adapter, found: {names}")
    return bases[0], (adapters[0] if adapters else None)


def is_gguf(path: Path) -> bool:
    """Whether `path` is a .gguf file or a folder of .gguf files without a config.json."""
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf"))


def reload_gguf(path: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """The GGUF model dequantized as llama.cpp decodes it, its adapter's L1 L2 added to the weights."""
    base, adapter = gguf_files(path)
    net = load_gguf(base, dtype)
    if adapter is not None:
        net = _merge_gguf_adapter(net, adapter, str(path))
    return net, gguf_tokenizer(str(base.resolve()))


GGUF = Target(
    "GGUF",
    write=write_gguf,
    detect=is_gguf,
    reload=reload_gguf,
    stored_bits=lambda path, net: _gguf_bits([f for f in gguf_files(path) if f is not None]),
    problem=gguf_problem,
    nearest=gguf_spec,
    decoded=_gguf_weight,
    check_model=check_llama,
    options=("embedding",),
)
