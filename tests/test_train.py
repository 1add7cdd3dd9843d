"""`fastdpo train`: accumulation, frozen reference, exact resume, outputs, and the DPO closed form."""

import json
import os
import shutil

import pytest
import torch

from fastdpo.config import build_config
from fastdpo.errors import UserError
from fastdpo.training import fit, setup, train

from conftest import assert_same_weights, load_state, make_model_dir, model_and_pairs, run_cli, write_jsonl


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return model_and_pairs(tmp_path_factory, "train", seed=3, rows=24)


def config(base, out, *flags):
    root, model, data = base
    return build_config(["--model", model, "--data", data, "--output_dir", str(out), "--learning_rate", "1e-3",
                         "--max_steps", "3", "--batch_size", "8", "--progress", "false", "--lr_scheduler", "linear",
                         "--warmup_steps", "1", *flags])


def run(base, out, *flags):
    return train(config(base, out, *flags))


def cut_after_checkpoint(full, cut, step: int) -> None:
    """`cut`: the output directory of `full`'s run as a crash right after its step-`step` checkpoint left it (no
    final model, later checkpoints unwritten, `latest` at that step, metrics lines past it still there)."""
    shutil.copytree(full, cut)
    checkpoints = os.path.join(cut, "checkpoints")
    for name in os.listdir(cut):
        if name not in ("checkpoints", "config.yaml", "metrics.jsonl"):
            path = os.path.join(cut, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    for name in os.listdir(checkpoints):
        if name.startswith("step-") and int(name.split("-")[1]) > step:
            shutil.rmtree(os.path.join(checkpoints, name))
    with open(os.path.join(checkpoints, "latest"), "w") as f:
        f.write(f"step-{step}\n")


def test_grad_accumulation_8x1_equals_1x8(base, tmp_path):
    """Three AdamW steps of 8 pairs, as 8 micro-batches of 1 or one of 8. Adam divides by sqrt(v) + ε, which turns
    float rounding in near-zero gradients (lm_head rows of unseen tokens) into ±lr-sized moves at ε = 1e-8; a
    larger ε keeps the comparison about the accumulated gradients, which must agree to float rounding."""
    run(base, tmp_path / "a", "--micro_batch_size", "8", "--adam_epsilon", "1e-5", "--logging_steps", "1")
    run(base, tmp_path / "b", "--micro_batch_size", "1", "--adam_epsilon", "1e-5", "--logging_steps", "1")
    assert_same_weights(tmp_path / "a", tmp_path / "b", atol=1e-6)
    # Adam is nearly scale-invariant, so also check the gradient's size: its norm before clipping, per step.
    norms = [[json.loads(line)["grad_norm"] for line in open(tmp_path / run_dir / "metrics.jsonl")
              if "grad_norm" in line] for run_dir in ("a", "b")]
    assert len(norms[0]) == 3 and norms[0] == pytest.approx(norms[1], rel=1e-5)


def test_reference_copy_is_frozen_and_policy_moves(base, tmp_path):
    run_ = setup(config(base, tmp_path / "out"))
    start = {k: v.clone() for k, v in run_.policy.state_dict().items()}
    reference = run_.reference
    fit(run_)
    assert reference.model is not None
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, start[key]), key
    trained = load_state(tmp_path / "out")
    assert any(not torch.equal(trained[k], start[k]) for k in trained)


def test_resume_equals_an_uninterrupted_run(base, tmp_path):
    run(base, tmp_path / "full", "--max_steps", "6", "--save_steps", "2")
    cut_after_checkpoint(tmp_path / "full", tmp_path / "cut", step=4)  # the run stops right after step 4's checkpoint
    assert not os.path.exists(tmp_path / "cut" / "model.safetensors")
    result = run(base, tmp_path / "cut", "--max_steps", "6", "--save_steps", "2", "--resume")
    assert result.steps == 6
    assert_same_weights(tmp_path / "full", tmp_path / "cut")
    steps = [json.loads(line)["step"] for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_outputs_load_with_plain_transformers_and_config_is_saved(base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run(base, tmp_path / "out", "--logging_steps", "1")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    AutoTokenizer.from_pretrained(tmp_path / "out")
    assert sum(p.numel() for p in model.parameters()) > 0
    saved = build_config(["--config", str(tmp_path / "out" / "config.yaml")])
    assert saved.max_steps == 3 and saved.learning_rate == 1e-3
    lines = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    train_lines = [line for line in lines if "loss" in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3]
    for key in ("epoch", "learning_rate", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm", "pairs_per_second",
                "tokens_per_second"):
        assert key in train_lines[0], key
    assert train_lines[0]["learning_rate"] == pytest.approx(1e-3 / 2)  # warm-up step 1 of 1


def test_non_empty_output_dir_is_refused_and_left_alone(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not empty"):
        run(base, out)
    assert (out / "precious.txt").read_text() == "keep me" and len(os.listdir(out)) == 1


def test_failed_run_with_overwrite_leaves_old_files(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    root, model, _ = base
    with pytest.raises(UserError):
        train(build_config(["--model", model, "--data", str(tmp_path / "missing.jsonl"), "--output_dir", str(out),
                            "--overwrite", "--progress", "false"]))
    assert (out / "precious.txt").read_text() == "keep me"


def test_lr_schedules():
    from fastdpo.training import lr_lambda

    cfg = build_config(["--warmup_steps", "2", "--lr_scheduler", "cosine"])
    f = lr_lambda(cfg, total_steps=10)
    assert [round(f(s), 4) for s in (0, 1, 2, 6, 10)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0, 0.5, 0.0]
    cfg = build_config(["--lr_scheduler", "linear"])
    assert lr_lambda(cfg, 4)(2) == 0.5
    cfg = build_config(["--lr_scheduler", "constant"])
    assert lr_lambda(cfg, 4)(3) == 1.0


def test_closed_form_optimum(tmp_path, capsys):
    """DPO's optimum on the candidates is π_ref(y|x)·exp(r(x,y)/β)/Z(x) (Eq 4 of arXiv:2305.18290).

    Pairs come from a Bradley-Terry reward over three one-word answers per prompt: each ordered pair (y_i, y_j)
    appears in proportion to σ(r_i - r_j). After training, the policy restricted to the candidates must match the
    closed form within total variation 0.02.
    """
    from fastdpo.batching import collate_concatenated
    from fastdpo.logps import sequence_logps
    from fastdpo.models import load_tokenizer
    from fastdpo.tokenize import TokenizedPair, encode_record
    from fastdpo.data import Record

    from transformers import AutoModelForCausalLM

    beta = 0.5
    prompts = ["Question: Pick a colour.\nAnswer:", "Question: Pick an animal.\nAnswer:"]
    candidates = [[" water", " help", " time"], [" cat", " dog", " good"]]  # one token each
    rewards = [[0.0, 0.4, 0.8], [0.6, 0.0, 0.3]]
    rows = []
    for prompt, cands, r in zip(prompts, candidates, rewards):
        for i in range(3):
            for j in range(3):
                if i != j:
                    count = round(40 * torch.sigmoid(torch.tensor(r[i] - r[j])).item())
                    rows += [{"prompt": prompt, "chosen": cands[i], "rejected": cands[j]}] * count
    data = write_jsonl(tmp_path / "bt.jsonl", rows)
    model_dir = make_model_dir(tmp_path / "ref", seed=5)
    out = tmp_path / "out"
    run_cli(["train", "--model", model_dir, "--data", data, "--output_dir", str(out), "--beta", str(beta),
             "--batch_size", str(len(rows)), "--max_steps", "150", "--learning_rate", "0.01", "--lr_scheduler",
             "constant", "--max_grad_norm", "0", "--progress", "false"], capsys)

    tok = load_tokenizer(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(out)
    for prompt, cands, r in zip(prompts, candidates, rewards):
        encoded = [encode_record(Record(prompt, c, c, "t"), tok) for c in cands]
        pairs = [TokenizedPair(p, c, c, 0) for p, c, _, _ in encoded]
        batch = collate_concatenated(pairs, tok.pad_token_id)
        with torch.no_grad():
            ref_logps = sequence_logps(ref, batch)[0][: len(cands)]
            pol_logps = sequence_logps(policy, batch)[0][: len(cands)]
        target = torch.softmax(ref_logps + torch.tensor(r) / beta, 0)
        trained = torch.softmax(pol_logps, 0)
        tv = 0.5 * (target - trained).abs().sum().item()
        start = 0.5 * (target - torch.softmax(ref_logps, 0)).abs().sum().item()
        assert tv < 0.02, (tv, target, trained)
        assert start > 0.1  # the check is not trivially met by the reference itself
        implied = beta * (pol_logps - ref_logps)  # the implicit reward recovers r up to a constant
        torch.testing.assert_close(implied - implied.mean(), torch.tensor(r) - sum(r) / 3, atol=0.05, rtol=0)


def test_resume_with_other_data_or_batches_is_refused(base, tmp_path):
    run(base, tmp_path / "o", "--max_steps", "4", "--save_steps", "2")
    with pytest.raises(UserError, match="resume with the same data and batch_size"):
        run(base, tmp_path / "o", "--max_steps", "4", "--save_steps", "2", "--batch_size", "4", "--resume")


def test_resuming_a_finished_run_does_nothing(base, tmp_path, capsys):
    run(base, tmp_path / "o", "--max_steps", "4", "--save_steps", "2", "--eval_data", base[2])
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()}
    result = run(base, tmp_path / "o", "--max_steps", "4", "--save_steps", "2", "--resume", "--eval_data", base[2])
    assert "is finished (4 of 4 steps); nothing to do" in capsys.readouterr().err
    assert result.steps == 4 and result.eval_before is not None and result.eval_before["rewards/accuracies"] == 0.0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()} == before  # nothing rewritten


def test_a_larger_max_steps_continues_a_finished_run_exactly(base, tmp_path, capsys):
    """Constant learning rate: 4 steps, then --resume to 6, equals 6 steps at once, bit for bit. With a linear
    schedule the rest of the run follows the schedule recomputed for 6 steps."""
    flags = ["--lr_scheduler", "constant", "--warmup_steps", "0", "--save_steps", "2", "--logging_steps", "1"]
    run(base, tmp_path / "six", "--max_steps", "6", *flags)
    run(base, tmp_path / "cut", "--max_steps", "4", *flags)
    result = run(base, tmp_path / "cut", "--max_steps", "6", *flags, "--resume")
    assert "resuming a run of 4 steps at step 4 to train to 6" in capsys.readouterr().err and result.steps == 6
    assert_same_weights(tmp_path / "six", tmp_path / "cut")
    run(base, tmp_path / "lin", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1")
    run(base, tmp_path / "lin", "--max_steps", "6", "--save_steps", "2", "--logging_steps", "1", "--resume")
    lrs = {line["step"]: line["learning_rate"] for line in map(json.loads, open(tmp_path / "lin" / "metrics.jsonl"))
           if "learning_rate" in line}
    # warm-up 1 step, then linear decay to 0 at step 6: the rate of step 5 (index 4) is 1e-3 * (1 - 3/5)
    assert lrs[5] == pytest.approx(1e-3 * (1 - 3 / 5)) and lrs[4] == pytest.approx(1e-3 * (1 - 2 / 3))


def test_more_epochs_continue_a_finished_run_exactly(base, tmp_path, capsys):
    """24 pairs, batches of 8: one epoch is 3 steps; --epochs 2 on it resumes at step 3 and ends where a 2-epoch run
    does, with the second epoch's shuffled order."""
    flags = ["--max_steps", "0", "--lr_scheduler", "constant", "--warmup_steps", "0", "--save_steps", "3"]
    run(base, tmp_path / "two", "--epochs", "2", *flags)
    run(base, tmp_path / "cut", "--epochs", "1", *flags)
    result = run(base, tmp_path / "cut", "--epochs", "2", *flags, "--resume")
    assert "resuming a run of 3 steps at step 3 to train to 6" in capsys.readouterr().err and result.steps == 6
    assert_same_weights(tmp_path / "two", tmp_path / "cut")


def test_trainer_state_names_the_epoch_and_batch_of_its_last_step():
    from fastdpo.checkpoint import TrainerState

    state = TrainerState(steps_per_epoch=3, total_steps=9, step=3)
    assert (state.to_json()["epoch"], state.to_json()["batch_in_epoch"]) == (0, 3)  # the last batch of epoch 0
    state.step = 4
    assert (state.to_json()["epoch"], state.to_json()["batch_in_epoch"]) == (1, 1)
    assert TrainerState.from_json(state.to_json()) == state
