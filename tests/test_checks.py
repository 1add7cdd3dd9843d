"""Checks before the heavy work and messages that point at the fix: tokenizers that cannot do the job (for several
model families), positions shorter than max_length, a reference with another vocabulary, prompts repeated inside the
responses, missing fields, TRL's option names, the file shapes users bring, and skip reasons with counts."""

import gzip
import json
import os
import shutil

import pytest
import torch

from fastdpo.data import load_records

from conftest import example_rows, make_model_dir, run_cli, word_tokenizer, write_jsonl

GOOD = {"prompt": "Question: How do I swim?\nAnswer:", "chosen": " Float first.", "rejected": " No."}
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


def family(name: str, vocab: int = 1024, positions: int = 2048):
    """A tiny random model of one family, its config's special ids in the built-in tokenizer's range."""
    from transformers import (GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=positions,
                                          **ids))
    cls, config = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config),
                   "gemma": (GemmaForCausalLM, GemmaConfig), "mistral": (MistralForCausalLM, MistralConfig)}[name]
    extra = {"head_dim": 16} if name == "gemma" else {}
    return cls(config(vocab_size=vocab, max_position_embeddings=positions, **SMALL, **ids, **extra))


def train_args(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output_dir", str(out), "--max_steps", "1",
            "--batch_size", "4", "--progress", "false", *map(str, extra)]


def one_line(capsys_result=None) -> str:
    lines = run_cli.last_stderr.strip().splitlines()
    assert "Traceback" not in run_cli.last_stderr
    return lines[-1]


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2", "gemma", "mistral"])
def test_a_model_directory_without_its_tokenizer_is_one_line_for_every_family(name, tmp_path, capsys):
    family(name).save_pretrained(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 4)
    run_cli(train_args(tmp_path / "m", data, tmp_path / "out"), capsys, expect_code=1)
    line = one_line()
    assert line.startswith(f"fastdpo: error: --model: {tmp_path / 'm'}: ")
    assert "its tokenizer is empty" in line or "could not load a tokenizer" in line, line
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_without_an_eos_token_is_refused(tmp_path, capsys):
    tok = word_tokenizer()
    tok.eos_token = None
    family("llama", vocab=64).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    run_cli(train_args(tmp_path / "m", write_jsonl(tmp_path / "d.jsonl", [GOOD]), tmp_path / "out"), capsys,
            expect_code=1)
    assert "its tokenizer has no EOS token" in one_line()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_max_length_is_capped_to_the_models_positions_with_a_notice(name, tmp_path, capsys):
    """A GPT-2-style position table of 64 entries and the default max_length of 1024: capped, and a pair longer
    than the table trains (before, the position embedding raised an IndexError at the first step)."""
    from fastdpo.models import load_tokenizer

    model = family(name, positions=64)
    model.save_pretrained(tmp_path / "m")
    load_tokenizer("builtin:tiny").save_pretrained(tmp_path / "m")
    long = dict(GOOD, chosen=" " + " ".join(["float"] * 150))
    out = tmp_path / "out"
    run_cli(train_args(tmp_path / "m", write_jsonl(tmp_path / "d.jsonl", [long, GOOD] * 2), out), capsys)
    assert "--max_length 1024 is longer than the 64 positions of --model; using --max_length 64 and " \
           "--max_prompt_length 32" in run_cli.last_stderr
    saved = json.load(open(out / "results.json"))
    assert saved["steps"] == 1 and "max_length: 64" in (out / "config.yaml").read_text()


def test_a_reference_with_another_tokenizer_or_a_smaller_vocabulary_is_refused(tmp_path, capsys):
    policy = make_model_dir(tmp_path / "policy", seed=1)
    data = write_jsonl(tmp_path / "d.jsonl", example_rows(4))
    other = tmp_path / "other"
    family("llama", vocab=1024).save_pretrained(other)
    word_tokenizer().save_pretrained(other)
    run_cli(train_args(policy, data, tmp_path / "o1", "--ref_model", other), capsys, expect_code=1)
    assert "--ref_model: " in one_line() and "its tokenizer differs from the policy's" in one_line()
    small = tmp_path / "small"
    family("llama", vocab=600).save_pretrained(small)  # no tokenizer files: its vocabulary is checked
    run_cli(train_args(policy, data, tmp_path / "o2", "--ref_model", small), capsys, expect_code=1)
    assert "--ref_model: the model's vocabulary has 600 rows but the tokenizer has 102" in one_line()
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_policy_whose_vocabulary_is_smaller_than_its_tokenizer_is_refused(tmp_path, capsys):
    from fastdpo.models import load_tokenizer

    family("qwen2", vocab=500).save_pretrained(tmp_path / "m")
    load_tokenizer("builtin:tiny").save_pretrained(tmp_path / "m")
    run_cli(train_args(tmp_path / "m", write_jsonl(tmp_path / "d.jsonl", [GOOD]), tmp_path / "out"), capsys,
            expect_code=1)
    assert "--model: the model's vocabulary has 500 rows but the tokenizer has 102" in one_line()


# --- prompts repeated inside the responses -------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What colour is the sky ?"}
BLUE, NO = {"role": "assistant", "content": "blue"}, {"role": "assistant", "content": "no"}


@pytest.mark.parametrize("row", [
    {"prompt": [SYSTEM, USER], "chosen": [SYSTEM, USER, BLUE], "rejected": [SYSTEM, USER, NO]},  # the whole prompt
    {"prompt": [SYSTEM, USER], "chosen": [USER, BLUE], "rejected": [USER, NO]},  # its last message only
])
def test_responses_that_repeat_the_conversation_are_cut_to_the_answers(row, tmp_path):
    record = load_records(write_jsonl(tmp_path / "d.jsonl", [row])).records[0]
    assert (record.prompt, record.chosen, record.rejected, record.repeated_prompt) == ([SYSTEM, USER], [BLUE], [NO],
                                                                                      True)


def test_text_responses_that_repeat_the_prompt_are_cut_and_counted(tmp_path, capsys):
    from fastdpo.models import load_tokenizer

    repeated = [dict(r, chosen=r["prompt"] + r["chosen"], rejected=r["prompt"] + r["rejected"])
                for r in example_rows(6)]
    record = load_records(write_jsonl(tmp_path / "r.jsonl", repeated)).records[0]
    assert (record.chosen, record.repeated_prompt) == (example_rows(1)[0]["chosen"], True)
    model = make_model_dir(tmp_path / "m", seed=3)
    run_cli(train_args(model, tmp_path / "r.jsonl", tmp_path / "out"), capsys)
    assert "6 responses repeated their prompt (removed from them)" in run_cli.last_stderr
    assert load_tokenizer  # the built-in tokenizer tokenized them (no boundary mismatch reported)
    assert "boundaries tokenized apart" not in run_cli.last_stderr


def test_a_conversation_that_differs_after_the_prompt_keeps_its_responses(tmp_path):
    row = {"prompt": [USER], "chosen": [BLUE, USER, BLUE], "rejected": [NO]}
    record = load_records(write_jsonl(tmp_path / "d.jsonl", [row])).records[0]
    assert (record.chosen, record.rejected, record.repeated_prompt) == ([BLUE, USER, BLUE], [NO], False)


# --- messages that point at the fix ---------------------------------------------------------------------------


def test_a_missing_field_lists_the_records_fields_and_the_flag_that_names_one(tmp_path, capsys):
    model = make_model_dir(tmp_path / "m", seed=2)
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "Hi?", "response_a": " yes", "response_b": " no"}])
    run_cli(train_args(model, data, tmp_path / "out"), capsys, expect_code=1)
    assert one_line() == (f"fastdpo: error: {data}:1: missing field 'chosen' (the record has 'question', "
                          "'response_a', 'response_b') (name the field that holds it with --chosen_field FIELD, or "
                          "skip such records with --on_bad_record skip)")


@pytest.mark.parametrize("argv, hint", [
    (["--lr", "1e-5"], "unknown flag --lr (in fastdpo: --learning_rate)"),
    (["--num_train_epochs", "2"], "unknown flag --num_train_epochs (in fastdpo: --epochs)"),
    (["--per_device_train_batch_size", "4"], "(in fastdpo: --micro_batch_size)"),
    (["--gradient_accumulation_steps", "4"], "(in fastdpo: --batch_size (the pairs of one optimizer step"),
    (["--bf16"], "unknown flag --bf16 (in fastdpo: --precision bf16)"),
    (["--loss_type", "sigmoid"], "(in fastdpo: --loss)"),
    (["--loss", "dpo"], "--loss: unknown loss 'dpo' (fastdpo, like TRL, calls it 'sigmoid')"),
])
def test_trl_and_trainer_names_get_the_fastdpo_name(argv, hint, tmp_path, capsys):
    run_cli(["train", "--model", "m", "--data", "d.jsonl", *argv], capsys, expect_code=2)
    assert hint in one_line()


def test_the_file_shapes_users_bring_are_read(tmp_path):
    rows = example_rows(3)
    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines)
    (tmp_path / "lines.json").write_bytes(lines)  # what datasets' Dataset.to_json writes
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    with gzip.open(tmp_path / "d.jsonl.gz", "wb") as f:
        f.write(lines)
    with gzip.open(tmp_path / "d.json.gz", "wb") as f:
        f.write(json.dumps(rows).encode())
    for name in ("bom.jsonl", "lines.json", "bom.json", "d.jsonl.gz", "d.json.gz"):
        got = [(r.prompt, r.chosen, r.rejected) for r in load_records(str(tmp_path / name)).records]
        assert got == expected, name
    assert load_records(str(tmp_path / "lines.json")).records[1].where.endswith("lines.json:2")


def test_skipped_records_are_reported_by_reason_with_counts(tmp_path, capsys):
    model = make_model_dir(tmp_path / "m", seed=2)
    bad = ['{"prompt": "a", "chosen": 5, "rejected": " b"}', "{oops", '{"prompt": "a", "chosen": " b"}', "{no"]
    data = write_jsonl(tmp_path / "d.jsonl", example_rows(4) + bad)
    run_cli(train_args(model, data, tmp_path / "out", "--on_bad_record", "skip"), capsys)
    summary = next(line for line in run_cli.last_stderr.splitlines() if line.startswith("train data: 8 records ->"))
    assert f"skipped 4 bad records: 2 invalid JSON (first at {data}:6)" in summary
    assert f"1 field 'chosen' must be text or a list of messages, got int (first at {data}:5)" in summary
    assert f"1 missing field 'rejected' (first at {data}:7)" in summary


def test_a_wrong_eval_split_names_the_eval_split_flag(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    model = make_model_dir(tmp_path / "m", seed=2)
    data = write_jsonl(tmp_path / "d.jsonl", example_rows(4))
    datasets.DatasetDict({"dev": datasets.Dataset.from_list(example_rows(4, "eval"))}).save_to_disk(tmp_path / "ev")
    run_cli(train_args(model, data, tmp_path / "out", "--eval_data", tmp_path / "ev"), capsys, expect_code=1)
    assert one_line().endswith("no split 'test' (it has ['dev']); choose one with --eval_data_split")


def test_a_lora_adapter_records_an_absolute_base_path(tmp_path, capsys, monkeypatch):
    pytest.importorskip("peft")
    make_model_dir(tmp_path / "base", seed=2)
    write_jsonl(tmp_path / "d.jsonl", example_rows(4))
    monkeypatch.chdir(tmp_path)
    run_cli(train_args("base", "d.jsonl", "out", "--lora_r", "4"), capsys)
    config = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    shutil.move(str(tmp_path / "out"), str(tmp_path / "elsewhere"))
    os.chdir("/")  # the adapter's base is found from any directory
    run_cli(["eval", "--model", str(tmp_path / "elsewhere"), "--ref_model", str(tmp_path / "base"), "--data",
             str(tmp_path / "d.jsonl"), "--json"], capsys)
