"""`fastdpo eval --json` agrees with TRL 1.16's DPOTrainer.evaluate() on every shared metric and loss name."""

import json

import pytest

from fastdpo.models import asset_path, load_tokenizer

from conftest import run_cli, tiny_llama

trl = pytest.importorskip("trl", reason="the parity tests need TRL 1.16 (pip install -e '.[dev]')")

SHARED = ["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
          "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"]
SMOOTHED = {"robust", "exo_pair", "aot", "aot_unpaired"}  # the names TRL 1.16 applies label_smoothing to
METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    tok = load_tokenizer("builtin:tiny")
    rows = [json.loads(line) for line in open(asset_path("example/eval.jsonl"))][:16]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, seed in (("policy", 1), ("reference", 2)):
        tiny_llama(len(tok), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root, tok, rows


def trl_metrics(root, tok, rows, loss, label_smoothing):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from transformers import AutoModelForCausalLM

    args = DPOConfig(output_dir=str(root / "trl"), per_device_eval_batch_size=4, beta=0.1, loss_type=[loss],
                     label_smoothing=label_smoothing, report_to="none", use_cpu=True, bf16=False, fp16=False,
                     disable_tqdm=True, dataloader_num_workers=0)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(root / "policy"),
                         ref_model=AutoModelForCausalLM.from_pretrained(root / "reference"), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    result = trainer.evaluate(Dataset.from_list(rows))
    return {m: result[f"eval_{m}"] for m in METRICS}


@pytest.mark.parametrize("loss", SHARED)
def test_eval_matches_trl(setup, loss, capsys):
    root, tok, rows = setup
    smoothing = 0.1 if loss in SMOOTHED else 0.0
    out = run_cli(["eval", "--model", str(root / "policy"), "--ref_model", str(root / "reference"),
                   "--data", str(root / "pairs.jsonl"), "--loss", loss, "--beta", "0.1", "--batch_size", "4",
                   "--label_smoothing", str(smoothing), "--json"], capsys)
    ours = json.loads(out.strip().splitlines()[-1])
    theirs = trl_metrics(root, tok, rows, loss, smoothing)
    for metric in METRICS:
        assert abs(ours[metric] - theirs[metric]) <= 1e-4 * (1 + abs(theirs[metric])), (metric, ours, theirs)
    assert 0.0 < ours["rewards/accuracies"] < 1.0  # policy and reference differ: a non-trivial comparison
