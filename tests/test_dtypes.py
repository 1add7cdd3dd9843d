"""The weights' dtype follows the checkpoint unless --torch_dtype says otherwise; the saved model keeps the
checkpoint's dtype unless --save_dtype asks for another; the copy reference shares the policy's dtype, so step 0
is exact in every one."""

import json
import math
import os

import pytest
import torch

from fastdpo.config import build_config
from fastdpo.errors import UserError
from fastdpo.training import train

from conftest import example_rows, load_state, make_model_dir, write_jsonl


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtypes")
    return str(write_jsonl(root / "pairs.jsonl", example_rows(12)))


def saved_as(model_dir: str, dtype: torch.dtype, tmp_path) -> str:
    """A copy of a model directory with its weights saved in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / f"model-{str(dtype).removeprefix('torch.')}")
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def run(model: str, data: str, out, *flags):
    return train(build_config(["--model", model, "--data", data, "--eval_data", data, "--output_dir", str(out),
                               "--max_steps", "2", "--batch_size", "4", "--learning_rate", "1e-3", "--progress",
                               "false", *flags]))


def saved_dtypes(out) -> tuple[set, str]:
    config = json.load(open(os.path.join(out, "config.json")))
    return {t.dtype for t in load_state(out).values()}, config["dtype"]


def test_a_bf16_checkpoint_trains_and_saves_in_bf16_with_an_exact_step_0(pairs, tmp_path, capsys):
    model = saved_as(make_model_dir(tmp_path / "m", seed=1), torch.bfloat16, tmp_path)
    result = run(model, pairs, tmp_path / "out")
    assert next(result.model.parameters()).dtype == torch.bfloat16  # trained in the checkpoint's dtype
    assert "the policy trains in bfloat16 weights (the checkpoint's dtype)" in capsys.readouterr().err
    assert abs(result.eval_before["loss"] - math.log(2)) < 1e-6 and result.eval_before["rewards/margins"] == 0
    assert result.eval_after["loss"] < result.eval_before["loss"]
    assert saved_dtypes(tmp_path / "out") == ({torch.bfloat16}, "bfloat16")


def test_save_dtype_and_torch_dtype_override_the_checkpoint(pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    fp32 = make_model_dir(tmp_path / "m", seed=2)
    result = run(fp32, pairs, tmp_path / "bf16-trained", "--torch_dtype", "bfloat16")
    assert next(result.model.parameters()).dtype == torch.bfloat16
    assert saved_dtypes(tmp_path / "bf16-trained") == ({torch.float32}, "float32")  # the checkpoint's dtype
    state = load_state(tmp_path / "bf16-trained")
    assert all(torch.equal(v, v.bfloat16().float()) for v in state.values())  # the bf16 weights, widened
    run(fp32, pairs, tmp_path / "half", "--save_dtype", "bfloat16")
    assert saved_dtypes(tmp_path / "half") == ({torch.bfloat16}, "bfloat16")
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "half")).dtype == torch.bfloat16


def test_a_tied_model_saved_in_another_dtype_stays_tied(pairs, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from fastdpo.models import load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    gpt2.to(torch.bfloat16).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    run(str(tmp_path / "gpt2"), pairs, tmp_path / "out", "--save_dtype", "float32")
    assert "lm_head.weight" not in load_state(tmp_path / "out")  # saved once, under the embedding's name
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert loaded.dtype == torch.float32
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_a_float16_checkpoint_trains_in_float32_and_is_saved_as_float16(pairs, tmp_path, capsys):
    """AdamW cannot train float16 weights (its epsilon rounds to 0, and a weight without gradient becomes NaN):
    the policy trains in float32, says so, and is saved in the checkpoint's float16; asking for float16 is refused."""
    model = saved_as(make_model_dir(tmp_path / "m", seed=5), torch.float16, tmp_path)
    result = run(model, pairs, tmp_path / "out")
    assert next(result.model.parameters()).dtype == torch.float32
    assert "weights are float16, which AdamW cannot train: the policy trains in float32" in capsys.readouterr().err
    assert saved_dtypes(tmp_path / "out") == ({torch.float16}, "float16")
    assert all(torch.isfinite(v.float()).all() for v in load_state(tmp_path / "out").values())
    with pytest.raises(UserError, match="--torch_dtype float16: AdamW cannot train float16 weights"):
        run(model, pairs, tmp_path / "again", "--torch_dtype", "float16")
    assert not (tmp_path / "again").exists()


def test_trl_dtype_key_points_to_torch_dtype(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dtype: bfloat16\n")
    with pytest.raises(UserError, match="--torch_dtype"):
        build_config(["--config", str(path)])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_under_bf16_autocast_a_frozen_reference_holds_bf16_matmul_weights_and_step_0_is_exact(pairs, tmp_path,
                                                                                             family):
    """autocast casts the float32 matmul weights to bf16 at every forward: the frozen copy holds them in bf16 (half
    the bytes), its embeddings and norms (and GPT-2's tied lm_head) in float32, and computes what the policy
    computes, so the step-0 loss is ln 2 and the margin 0."""
    from fastdpo.training import fit, setup

    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        from fastdpo.models import load_tokenizer

        tokenizer = load_tokenizer("builtin:tiny")
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                   bos_token_id=0, eos_token_id=1)).save_pretrained(tmp_path / "m")
        tokenizer.save_pretrained(tmp_path / "m")
        model = str(tmp_path / "m")
    else:
        model = make_model_dir(tmp_path / "m", seed=4)
    run_ = setup(build_config(["--model", model, "--data", pairs, "--eval_data", pairs, "--output_dir",
                               str(tmp_path / "out"), "--max_steps", "1", "--batch_size", "4", "--precision", "bf16",
                               "--progress", "false"]))
    reference = run_.reference.model
    dtypes = {name: p.dtype for name, p in reference.named_parameters()}
    matmuls = [n for n in dtypes if ("proj" in n or "c_attn" in n or "c_fc" in n or n.startswith("lm_head"))]
    assert matmuls and all(dtypes[n] == torch.bfloat16 for n in matmuls)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "norm" in n or "ln_" in n or "embed" in n or "wte" in n)
    assert next(run_.policy.parameters()).dtype == torch.float32
    result = fit(run_)
    assert abs(result.eval_before["loss"] - math.log(2)) < 1e-6 and abs(result.eval_before["rewards/margins"]) < 1e-6
