"""scripts/peers.py: argument parsing, the missing-package message and the bits-per-weight mapping of every
peer format, on tiny random tensors; the peers' own libraries only where they are installed."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.quantizers.cost import storage_bits

ROOT = Path(__file__).parents[2]
spec = importlib.util.spec_from_file_location("peers", ROOT / "scripts" / "peers.py")
peers = sys.modules["peers"] = importlib.util.module_from_spec(spec)  # its dataclass looks itself up
spec.loader.exec_module(peers)

N, K = 8, 128  # a tiny [N, K] weight: 1024 weights


def test_every_row_is_selectable_and_an_unknown_row_is_refused(capsys):
    assert peers.parse_args([]).rows == list(peers.ROWS)
    assert peers.parse_args(["--only", "hqq:w3-g128,bnb:nf4-g64-dq"]).rows == [
        "hqq:w3-g128",
        "bnb:nf4-g64-dq",
    ]
    with pytest.raises(SystemExit):
        peers.parse_args(["--only", "hqq:w9"])
    assert "unknown row(s) hqq:w9" in capsys.readouterr().err


def test_a_missing_peer_package_stops_before_any_work_with_one_line(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "hqq" else real(name))
    assert peers.main(["--only", "lowbit-rtn:int3-g128,hqq:w3-g128,hqq:w4-g128"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing package(s) hqq:" in err and "lowbit[peers]" in err


def test_hqq_layout_counts_codes_scale_and_zero_at_their_dtypes():
    # w4 g64: two codes per uint8 over [N*K/64/2, 64]; fp16 scale and zero per group of 64
    G = N * K // 64
    stored = {
        "W_q": torch.randint(0, 255, (G // 2, 64), dtype=torch.uint8),
        "scale": torch.rand(G, 1).half(),
        "zero": torch.rand(G, 1).half(),
        "nbits": torch.tensor(4),
        "shape": torch.tensor([N, K]),
        "compute_dtype": torch.zeros(13, dtype=torch.uint8),
    }
    bits = peers.layer_bits("hqq", stored)
    assert bits == {"codes": 4 * N * K, "scales": 16 * G, "zeros": 16 * G, "lowrank": 0}
    assert peers.bits_per_weight({"l": bits}, {"l": (N, K)})["bits_per_weight"] == 4.5


def test_bnb_nf4_counts_absmax_per_64_with_double_quantization():
    stored = {
        "weight": torch.randint(0, 255, (N * K // 2, 1), dtype=torch.uint8),
        "absmax": torch.randint(0, 255, (N * K // 64,), dtype=torch.uint8),
        "nested_absmax": torch.rand(1),  # one fp32 per 256 absmax values
        "nested_offset": torch.tensor(0.1),
        "quant_map": torch.rand(16),  # fixed tables of the format: not counted
        "nested_quant_map": torch.rand(256),
    }
    got = peers.bits_per_weight({"l": peers.layer_bits("bnb-nf4", stored)}, {"l": (N, K)})
    assert got["codes"] == 4.0 and got["bits_per_weight"] == (4 * N * K + 8 * 16 + 32 + 32) / (N * K)


def test_compressed_tensors_counts_packed_codes_scales_and_zero_points():
    # w3 g64 as llm-compressor 0.14 wrote it: 3-bit codes packed densely into int32 along each row, scales
    # in the model's dtype (fp32), 3-bit zero points packed into int32 along the output rows
    stored = {
        "weight_packed": torch.zeros(N, K * 3 // 32, dtype=torch.int32),
        "weight_scale": torch.rand(N, K // 64),
        "weight_zero_point": torch.zeros(-(-N * 3 // 32), K // 64, dtype=torch.int32),
        "weight_shape": torch.tensor([N, K]),
    }
    bits = peers.layer_bits("compressed-tensors", stored)
    assert bits == {"codes": 3 * N * K, "scales": N * 2 * 32, "zeros": 2 * 32, "lowrank": 0}


def test_lowbit_mapping_equals_lowbit_own_storage_cost():
    w = torch.randn(N, K)
    for s in (
        lowbit.QuantSpec("int3", group_size=64),
        lowbit.QuantSpec("nf4", group_size=64, double_quant=True),
    ):
        q = lowbit.quantize(w, s)
        assert sum(peers.layer_bits("lowbit", q.tensors()).values()) == storage_bits(s, (N, K))


def test_a_stored_tensor_the_format_does_not_map_is_an_error():
    with pytest.raises(peers.PeerError, match="stores \\['weight_extra'\\]"):
        peers.layer_bits(
            "compressed-tensors", {"weight_packed": torch.zeros(1), "weight_extra": torch.zeros(1)}
        )
    with pytest.raises(peers.PeerError, match="differ"):
        peers.bits_per_weight({"a": dict.fromkeys(peers.PARTS, 0)}, {"b": (N, K)})


def test_hqq_library_tensors_map_to_the_documented_size():
    pytest.importorskip("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    lin = torch.nn.Linear(K, N, bias=False)
    cfg = BaseQuantizeConfig(nbits=4, group_size=64, axis=1)
    hq = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float16, device="cpu", del_orig=False)
    bits = peers.layer_bits("hqq", hq.state_dict())
    assert peers.bits_per_weight({"l": bits}, {"l": (N, K)})["bits_per_weight"] == 4.5


def test_bnb_library_tensors_map_to_the_documented_size():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(torch.randn(N, K), blocksize=64, compress_statistics=True, quant_type="nf4")
    got = peers.bits_per_weight({"l": peers.layer_bits("bnb-nf4", peers.bnb_stored(q, state))}, {"l": (N, K)})
    assert got["bits_per_weight"] == (4 * N * K + 8 * 16 + 32 + 32) / (N * K)
