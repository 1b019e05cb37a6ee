"""Shared fixtures: a tiny random Llama with a real (byte-level BPE) tokenizer, saved as a local folder."""

from pathlib import Path

import pytest
import torch

NEWS = [
    "The council voted on Tuesday to expand the city's bus network, adding three routes to the east.",
    "Shares in the mining company rose sharply after it reported a record quarterly profit.",
    "Firefighters battled the blaze for six hours before bringing it under control late last night.",
    "The minister said the new budget would focus on hospitals, schools and regional roads.",
    "Heavy rain is expected across the south coast this weekend, with flood warnings in place.",
    "The national team won the final match of the series by four wickets in front of a home crowd.",
    "Scientists at the university have found a new species of frog in the northern rainforest.",
    "Police are appealing for witnesses after a car crashed into a shop window in the main street.",
    "The airline announced it would cut two hundred jobs as fuel prices continue to climb.",
    "Voters will head to the polls next month in what analysts say will be a close election.",
]


def make_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="session")
def news_file(tmp_path_factory) -> Path:
    """A small local .txt corpus: documents separated by blank lines."""
    path = tmp_path_factory.mktemp("data") / "news.txt"
    path.write_text("\n\n".join(NEWS * 8))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + tokenizer saved with save_pretrained (a local 'model id')."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer(NEWS)
    model = make_tiny_llama(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def compress_recipes(root: Path, tokenizer, recipes: dict) -> Path:
    """One checkpoint per recipe under root/<name>, each from a fresh tiny Llama over the tokenizer."""
    from lowbit.compress.api import compress

    calib = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    for name, recipe in recipes.items():
        compress(
            make_tiny_llama(len(tokenizer)),
            recipe,
            root / name,
            tokenizer=tokenizer,
            calib_data=calib,
            progress=False,
        )
    return root


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def as_format_1(src: Path, dst: Path) -> Path:
    """A copy of checkpoint `src` at `dst` as format_version 1 wrote it: a byte per zero point ([N, G]),
    format_version 1 in the manifest and config.json, hashes updated."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from lowbit.nn.manifest import MANIFEST, WEIGHTS, sha256
    from lowbit.quantizers import QuantSpec, unpack

    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    state = load_file(str(dst / WEIGHTS))
    for fqn, e in manifest["layers"].items():
        spec = QuantSpec.from_dict(e["spec"])
        if spec.has_zeros:
            n, groups = e["shape"][0], spec.groups(e["shape"][1])
            state[f"{fqn}.zeros"] = unpack(state[f"{fqn}.zeros"][None], spec.bits, n * groups).view(n, groups)
    save_file(state, str(dst / WEIGHTS), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    manifest["format_version"] = 1
    for name in (WEIGHTS, "config.json"):
        manifest["files"][name] = sha256(dst / name)
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return dst
