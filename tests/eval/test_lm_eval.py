"""lm-evaluation-harness evaluates a lowbit checkpoint correctly: `HFLM(pretrained=lowbit.load(...))` on a
task built from local data scores exactly the log-likelihoods lowbit's model computes, and its
`--model hf` command line, which never imports lowbit, refuses the checkpoint instead of scoring random
weights (use HFLM from Python, after `import lowbit`, to evaluate one)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import lowbit  # noqa: F401  (registers the quantizer: HFLM then loads checkpoints by path)
from lowbit.compress.api import compress
from lowbit.nn.checkpoint import load, load_tokenizer
from tests.conftest import NEWS, make_tiny_llama, make_tokenizer

pytest.importorskip("lm_eval")

CHOICES = [" council", " company", " weekend"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    tok = make_tokenizer(NEWS)
    compress(make_tiny_llama(len(tok)), "int4-g128", root / "ckpt", tokenizer=tok, progress=False)
    docs = [
        {"text": text.split(" the")[0] + " the", "choices": CHOICES, "gold": i % 3}
        for i, text in enumerate(NEWS)
    ]
    (root / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / "local_news.yaml").write_text(
        "task: local_news\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {root / 'docs.jsonl'}}}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'target_delimiter: ""\n'
        'doc_to_text: "{{text}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return root, docs


def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-eval splits the pair: the whole text encoded, the context's
    tokens cut off the front."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)  # [T-1, V]
    return float(sum(logp[t - 1, whole[t]] for t in range(n_ctx, len(whole))))


def test_hflm_scores_what_lowbit_computes(setup, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root, docs = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = load(root / "ckpt"), load_tokenizer(root / "ckpt")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    tasks = TaskManager(include_path=str(root / "tasks"))
    r = simple_evaluate(model=lm, tasks=["local_news"], task_manager=tasks, log_samples=True)
    samples = sorted(r["samples"]["local_news"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    correct = 0
    for s, doc in zip(samples, docs, strict=True):
        mine = [continuation_logprob(model, tok, doc["text"], c) for c in CHOICES]
        theirs = [resp[0][0] for resp in s["resps"]]
        assert theirs == pytest.approx(mine, abs=1e-3)
        correct += int(max(range(3), key=mine.__getitem__) == doc["gold"])
    assert r["results"]["local_news"]["acc,none"] == pytest.approx(correct / len(docs))
    # with lowbit imported, a path as `pretrained` loads through transformers (with lowbit's checks)
    by_path = HFLM(pretrained=str(root / "ckpt"), batch_size=4, device="cpu", dtype="float32")
    again = simple_evaluate(model=by_path, tasks=["local_news"], task_manager=tasks, log_samples=True)
    again = sorted(again["samples"]["local_news"], key=lambda s: s["doc_id"])
    scores = [[resp[0][0] for resp in s["resps"]] for s in samples]
    assert [[resp[0][0] for resp in s["resps"]] for s in again] == scores  # the same model, bit for bit


def test_lm_eval_command_line_refuses_the_checkpoint_without_lowbit(setup):
    root, _ = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argv = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={root / 'ckpt'}"]
    argv += ["--tasks", "local_news", "--include_path", str(root / "tasks"), "--device", "cpu"]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "local_news" not in r.stdout  # no score printed
    # lm-eval reads config.json's quantization config itself and fails on the unknown method by name
    assert "Unknown quantization type, got lowbit" in r.stderr, r.stderr[-2000:]
