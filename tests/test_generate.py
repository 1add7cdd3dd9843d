"""`fastdpo generate`: samples from the policy itself (the options override the model's generation_config), cut
where the model stopped and never given an EOS it did not produce, each scored exactly (log-probs equal to a naive
per-token loop, KL = policy - reference, reward = β KL), through the CLI and the Python API."""

import json

import pytest
import torch

import fastdpo
from conftest import run_cli, tiny_llama, word_tokenizer, write_jsonl
from test_logps import naive_logps

from fastdpo.config import build_config
from fastdpo.generation import sample, stop_ids
from fastdpo.tokenize import encode_prompt

PROMPTS = [{"prompt": "The sky is"}, {"prompt": [{"role": "user", "content": "What colour is grass ?"}]},
           {"prompt": "hello", "chosen": " world", "rejected": " no"}, {"prompt": "The sky is"}]


@pytest.fixture(scope="module")
def models(word_models):
    return word_models


def test_rows_hold_exact_log_probs_kl_and_reward_for_text_chat_and_preference_prompts(models, tmp_path):
    """Three distinct prompts (the repeated one counted once), 3 samples each (an odd number: the last of a
    prompt is scored paired with itself): every sample's log-probs equal a naive per-token loop under each model,
    kl = policy - reference and reward = β kl; the summary is the rows' means."""
    tok = word_tokenizer()
    policy, reference = (tiny_llama(len(tok), seed=s) for s in (1, 2))
    result = fastdpo.generate(policy, PROMPTS, ref_model=reference, tokenizer=tok, num_samples=3,
                              max_new_tokens=6, beta=0.5, batch_size=2)
    assert len(result.rows) == 9 and result.summary["prompts"] == 3
    chat = encode_prompt(PROMPTS[1]["prompt"], tok, "x", 512)[0]
    assert chat[-1] == tok.convert_tokens_to_ids("<|assistant|>")  # the template's generation prompt
    for row in result.rows:
        prompt = encode_prompt(row["prompt"], tok, "x", 512)[0]
        for model, key in ((policy, "policy_logps"), (reference, "reference_logps")):
            assert row[key] == pytest.approx(naive_logps(model, prompt, row["response_ids"]), abs=1e-4)
        assert row["kl"] == pytest.approx(row["policy_logps"] - row["reference_logps"], abs=1e-9)
        assert row["reward"] == pytest.approx(0.5 * row["kl"], abs=1e-9)
        assert row["tokens"] == len(row["response_ids"]) <= 6
    assert result.summary["kl"] == pytest.approx(sum(r["kl"] for r in result.rows) / 9)
    assert result.summary["eos_rate"] == pytest.approx(sum(r["ended_with_eos"] for r in result.rows) / 9)


class Scripted(torch.nn.Module):
    """A model whose generate returns fixed continuations: one that stops with EOS (then padding), one cut at
    max_new_tokens."""

    generation_config = None

    def generate(self, input_ids, attention_mask, generation_config):
        assert generation_config.max_new_tokens == 4 and generation_config.num_return_sequences == 1
        new = torch.tensor([[20, 21, 1, 2], [22, 23, 24, 25]])
        return torch.cat([input_ids, new], dim=1)


def test_a_sample_ends_at_its_eos_and_a_cut_one_gets_none():
    cfg = build_config(["--model", "builtin:tiny", "--data", "builtin:example", "--max_new_tokens", "4"])
    samples = sample(Scripted(), [[0, 5, 6], [0, 7]], cfg, pad_token_id=2, stops=[1], device="cpu")
    assert [(s.response_ids, s.ended) for s in samples] == [([20, 21, 1], True), ([22, 23, 24, 25], False)]
    assert [s.prompt_ids for s in samples] == [[0, 5, 6], [0, 7]]


def token_ranks(model, prompt: list[int], response: list[int]) -> list[int]:
    """The rank of each response token among the model's next-token probabilities (0: the likeliest)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]  # (T, V)
    return [int((row > row[t]).sum()) for row, t in zip(logits, response)]


def test_sampling_is_the_policy_itself_whatever_the_models_generation_config(models, tmp_path, capsys):
    """The model directory's generation_config asks for top-k 2 and a repetition penalty that forbids repeats;
    by default fastdpo samples from the whole distribution (tokens ranked past 2 appear, and tokens repeat within
    a sample), and --top_k 2 is what restricts it."""
    from transformers import GenerationConfig

    GenerationConfig(do_sample=True, top_k=2, temperature=0.3, repetition_penalty=1e4).save_pretrained(
        models / "policy")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "The sky is"}, {"prompt": "hello world"}])
    policy = tiny_llama(len(word_tokenizer()), seed=1)
    ranks = {}
    for flags in ((), ("--top_k", "2")):
        out = tmp_path / f"s{len(flags)}.jsonl"
        run_cli(["generate", "--model", str(models / "policy"), "--data", str(data), "--num_samples", "16",
                 "--max_new_tokens", "8", "--out", str(out), *flags], capsys)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        prompts = {r["prompt_index"]: encode_prompt(r["prompt"], word_tokenizer(), "x", 512)[0] for r in rows}
        ranks[flags] = [k for r in rows for k in token_ranks(policy, prompts[r["prompt_index"]], r["response_ids"])]
        assert any(len(set(r["response_ids"])) < len(r["response_ids"]) for r in rows)  # no repetition penalty
    assert max(ranks[()]) >= 2 and max(ranks[("--top_k", "2")]) <= 1


def test_the_cli_writes_a_line_per_sample_prints_the_summary_and_repeats_with_the_seed(models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    args = ["generate", "--model", str(models / "policy"), "--ref_model", str(models / "reference"), "--data",
            str(data), "--num_samples", "2", "--max_new_tokens", "5", "--seed", "7"]
    first = run_cli(args + ["--out", str(tmp_path / "a.jsonl")], capsys)
    assert "6 samples of 3 prompts: mean length" in run_cli.last_stderr and "mean KL(π‖π_ref)" in run_cli.last_stderr
    assert first == ""  # the rows went to the file
    out = run_cli(args + ["--json"], capsys)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["samples"] == 6 and set(summary) >= {"mean_tokens", "eos_rate", "kl", "kl_stderr", "reward"}
    again = run_cli(args, capsys)  # rows on stdout
    assert [json.loads(line) for line in again.splitlines()] == \
        [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("flags, code, message", [
    ([], 2, "--data: generate needs prompts"),
    (["--data", "DATA", "--top_p", "0"], 2, "--top_p: must be in (0, 1], got 0.0"),
    (["--data", "DATA", "--num_samples", "0"], 2, "--num_samples: must be >= 1, got 0"),
    (["--data", "DATA", "--loss", "ipo"], 2, "--loss"),  # generate takes no loss options
    (["--data", "BAD"], 1, "bad.jsonl:2: field 'prompt' is an empty string"),
])
def test_bad_input_is_one_line_naming_the_flag_or_the_record(models, tmp_path, capsys, flags, code, message):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hello"}, {"prompt": " "}])
    flags = [{"DATA": str(data), "BAD": str(bad)}.get(f, f) for f in flags]
    run_cli(["generate", "--model", str(models / "policy"), *flags], capsys, expect_code=code)
    assert message in run_cli.last_stderr and "Traceback" not in run_cli.last_stderr


def test_stop_ids_include_the_models_generation_config_eos():
    class M:
        class generation_config:
            eos_token_id = [7, 1]

    assert stop_ids(M(), word_tokenizer()) == [1, 7]


# --- --eval_samples: samples at every evaluation during training ---------------------------------------------------

def train_args(out, *extra):
    return ["train", "--model", "builtin:tiny", "--data", "builtin:example", "--eval_data", "builtin:example-eval",
            "--output_dir", str(out), "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2",
            "--batch_size", "4", "--learning_rate", "1e-4", "--progress", "false", *extra]


def test_eval_samples_are_logged_at_every_evaluation_and_leave_training_unchanged(tmp_path, capsys):
    """2 prompts x 2 samples at steps 0, 2 and 4: a samples.jsonl row each and a samples/ metrics line each time;
    at step 0 the policy is its reference (KL exactly 0); the trained weights equal a run without samples."""
    from conftest import assert_same_weights

    run_cli(train_args(tmp_path / "plain"), capsys)
    run_cli(train_args(tmp_path / "sampled", "--eval_samples", "2", "--num_samples", "2", "--max_new_tokens", "6"),
            capsys)
    rows = [json.loads(line) for line in (tmp_path / "sampled" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] * 4 + [2] * 4 + [4] * 4
    assert all(r["kl"] == 0.0 for r in rows if r["step"] == 0) and any(r["kl"] != 0.0 for r in rows[4:])
    lines = [json.loads(line) for line in (tmp_path / "sampled" / "metrics.jsonl").read_text().splitlines()]
    means = {r["step"]: r for r in lines if "samples/kl" in r}
    assert sorted(means) == [0, 2, 4]
    for step, record in means.items():
        at = [r for r in rows if r["step"] == step]
        assert record["samples/kl"] == pytest.approx(sum(r["kl"] for r in at) / 4)
        assert record["samples/tokens"] == pytest.approx(sum(r["tokens"] for r in at) / 4)
        assert all(r["kl"] == pytest.approx(r["policy_logps"] - r["reference_logps"]) for r in at)
    assert_same_weights(tmp_path / "plain", tmp_path / "sampled")


@pytest.mark.parametrize("extra, message", [
    (["--eval_data", "", "--eval_samples", "2"], "--eval_samples 2: needs --eval_data"),
    (["--eval_samples", "2", "--reference", "precomputed"], "--eval_samples 2: needs the reference model"),
    (["--temperature", "0.7"], "--temperature: a sampling option, which training uses only with --eval_samples"),
])
def test_eval_samples_misuse_is_one_line(tmp_path, capsys, extra, message):
    run_cli(train_args(tmp_path / "o", *extra), capsys, expect_code=2)
    assert message in run_cli.last_stderr and "Traceback" not in run_cli.last_stderr
    assert not (tmp_path / "o").exists()
