"""LoRA: the reference is the base with adapters off; saved adapters and merged models reproduce the policy;
TR-DPO's soft reference update; reference-free losses build no reference."""

import json

import pytest
import torch

pytest.importorskip("peft", reason="LoRA needs peft (pip install -e '.[dev]')")

from fastdpo.batching import collate_concatenated  # noqa: E402
from fastdpo.config import build_config  # noqa: E402
from fastdpo.errors import UserError  # noqa: E402
from fastdpo.logps import sequence_logps  # noqa: E402
from fastdpo.reference import NoReference  # noqa: E402
from fastdpo.training import fit, setup, train  # noqa: E402

from conftest import load_state, model_and_pairs, run_cli  # noqa: E402
from test_train import cut_after_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return model_and_pairs(tmp_path_factory, "lora", seed=6, rows=16)


def flags(base, out, *extra):
    root, model, data = base
    return ["--model", model, "--data", data, "--output_dir", str(out), "--learning_rate", "5e-3", "--max_steps",
            "3", "--batch_size", "8", "--progress", "false", "--ref_cache_dir", "off", *extra]


def probe_batch(base):
    from fastdpo.models import load_tokenizer
    from fastdpo.prepare import load_pairs
    from fastdpo.data import Fields

    root, model, data = base
    pairs, _ = load_pairs(data, "train", load_tokenizer(model), fields=Fields(), max_length=1024,
                          max_prompt_length=512)
    return collate_concatenated(pairs[:4], 2)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A LoRA run; captures the reference's and the trained policy's log-probs on a probe batch in memory."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("run") / "out"
    batch = probe_batch(base)
    seen = {}
    run = setup(build_config(flags(base, out, "--lora_r", "4", "--lora_alpha", "8")))
    seen["reference"] = run.reference.logps(batch, range(batch.num_pairs))
    seen["base_before"] = {k: v.clone() for k, v in run.policy.get_base_model().state_dict().items()
                           if "lora_" not in k}
    seen["checkpointing"] = run.policy.get_base_model().is_gradient_checkpointing  # what the loop trains with
    fit(run)
    with torch.no_grad():
        seen["policy"] = sequence_logps(run.policy.get_base_model(), batch)[0]
    seen["base_after"] = {k: v.clone() for k, v in run.policy.get_base_model().state_dict().items()
                          if "lora_" not in k}
    with torch.no_grad():
        seen["base_model"] = sequence_logps(AutoModelForCausalLM.from_pretrained(base[1]), batch)[0]
    return out, batch, seen


def test_reference_is_the_base_model_and_only_adapters_train(trained):
    out, batch, seen = trained
    torch.testing.assert_close(seen["reference"], seen["base_model"], atol=1e-5, rtol=0)
    for key, value in seen["base_before"].items():
        assert torch.equal(value, seen["base_after"][key]), key
    assert (seen["policy"] - seen["base_model"]).abs().max() > 1e-3  # the adapters did learn something
    assert seen["checkpointing"]  # --gradient_checkpointing auto: on with LoRA


def test_saved_adapter_and_merged_model_reproduce_the_policy(base, trained, tmp_path):
    """The saved adapter on its base, and a --merge_lora run of the same settings (merged in memory and saved), all
    give the trained policy's log-probs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, batch, seen = trained
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # no full copy of the weights
    merged_run = train(build_config(flags(base, tmp_path / "m", "--lora_r", "4", "--lora_alpha", "8",
                                          "--merge_lora")))
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base[1]), out).eval()
        via_peft = sequence_logps(adapted.get_base_model(), batch)[0]
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "merged")
        via_merged = sequence_logps(merged, batch)[0]
        in_memory = sequence_logps(merged_run.model, batch)[0]
    assert not hasattr(merged_run.model, "peft_config")  # the merged model itself is handed back
    torch.testing.assert_close(via_peft, seen["policy"], atol=1e-4, rtol=0)
    torch.testing.assert_close(via_merged, seen["policy"], atol=1e-4, rtol=0)
    torch.testing.assert_close(in_memory, via_merged, atol=1e-5, rtol=0)


def test_the_python_api_evaluates_a_lora_policy_held_in_memory(base, trained):
    """fastdpo.evaluate on the peft model fastdpo.train returned: its adapters on, against the base."""
    import fastdpo

    out, batch, seen = trained
    result = fastdpo.train(model=base[1], data=base[2], output_dir=str(out.parent / "api"), lora_r=4, lora_alpha=8,
                           learning_rate=5e-3, max_steps=3, batch_size=8, progress=False, ref_cache_dir="off")
    scores = fastdpo.evaluate(model=result.model, ref_model=base[1], data=base[2], batch_size=4)
    first = scores.rows[:4]
    got = torch.tensor([r["policy_chosen_logps"] for r in first] + [r["policy_rejected_logps"] for r in first])
    torch.testing.assert_close(got, seen["policy"], atol=1e-3, rtol=0)
    assert not result.model.training


def test_eval_accepts_an_adapter_directory(base, trained, capsys, tmp_path):
    out, batch, seen = trained
    per_pair = tmp_path / "pairs.jsonl"
    run_cli(["eval", "--model", str(out), "--ref_model", base[1], "--data", base[2], "--json", "--per_pair_out",
             str(per_pair)], capsys)
    rows = [json.loads(line) for line in per_pair.read_text().splitlines()][:4]
    got = torch.tensor([r["policy_chosen_logps"] for r in rows] + [r["policy_rejected_logps"] for r in rows])
    torch.testing.assert_close(got, seen["policy"], atol=1e-3, rtol=0)


def test_lora_resume_equals_an_uninterrupted_run(base, tmp_path):
    train(build_config(flags(base, tmp_path / "full", "--lora_r", "4", "--max_steps", "4", "--save_steps", "2")))
    cut_after_checkpoint(tmp_path / "full", tmp_path / "cut", step=2)
    train(build_config(flags(base, tmp_path / "cut", "--lora_r", "4", "--max_steps", "4", "--save_steps", "2",
                             "--resume")))
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_tr_dpo_sync_follows_the_formula(base, tmp_path):
    """One step with ref_sync_steps 1, α = 0.25: ref = 0.25·policy_after_step + 0.75·policy_before."""
    seen = {}
    out = tmp_path / "out"
    run = setup(build_config(flags(base, out, "--max_steps", "1", "--ref_sync_steps", "1", "--ref_sync_alpha",
                                   "0.25")))
    seen["start"] = {k: v.clone() for k, v in run.policy.state_dict().items()}
    seen["reference"] = run.reference.model
    fit(run)
    trained = load_state(out)
    moved = 0
    for key, ref in seen["reference"].state_dict().items():
        expected = 0.25 * trained[key] + 0.75 * seen["start"][key]
        torch.testing.assert_close(ref, expected, atol=1e-6, rtol=0, msg=key)
        moved += not torch.equal(ref, seen["start"][key])
    assert moved > 0


def test_reference_none_with_simpo_never_builds_a_reference(base, tmp_path, monkeypatch):
    import copy

    from transformers import AutoModelForCausalLM

    loads = []
    original_load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(a) or original_load(*a, **k))
    deepcopy = copy.deepcopy

    def no_model_copies(obj, *args, **kwargs):
        assert not isinstance(obj, torch.nn.Module), "a copy of the model was made"
        return deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_model_copies)
    run = setup(build_config(flags(base, tmp_path / "out", "--reference", "none", "--loss", "simpo", "--beta", "2")))
    result = fit(run)
    assert len(loads) == 1 and isinstance(run.reference, NoReference) and result.steps == 3


@pytest.mark.parametrize("extra, message", [
    (["--lora_r", "4", "--load_in_4bit"], "need a CUDA GPU"),
    (["--reference", "precomputed", "--ref_sync_steps", "2"], "precomputed reference cannot change"),
    (["--lora_r", "4", "--ref_sync_steps", "2"], "adapters off"),
    (["--reference", "none", "--loss", "sigmoid"], "needs a reference"),
    (["--merge_lora"], "needs LoRA"),
])
def test_reference_and_lora_misuse_is_a_clear_error(base, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train(build_config(flags(base, tmp_path / "out", *extra)))


def test_a_bad_adapter_path_is_one_line(base, tmp_path, capsys):
    run_cli(["train", *flags(base, tmp_path / "out", "--adapter", str(tmp_path / "nope"))], capsys, expect_code=1)
    assert "--adapter" in run_cli.last_stderr and "Traceback" not in run_cli.last_stderr


def test_adapter_reference_has_no_dropout(base, trained, tmp_path):
    """A starting adapter saved with dropout 0.5: its frozen "ref" copy must still score deterministically."""
    out, batch, seen = trained
    config = json.loads((out / "adapter_config.json").read_text())
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    (noisy / "adapter_config.json").write_text(json.dumps(dict(config, lora_dropout=0.5)))
    (noisy / "adapter_model.safetensors").write_bytes((out / "adapter_model.safetensors").read_bytes())
    run = setup(build_config(flags(base, tmp_path / "o", "--adapter", str(noisy), "--max_steps", "1")))
    run.policy.train()
    refs = [run.reference.logps(batch, range(batch.num_pairs)) for _ in range(2)]
    torch.testing.assert_close(refs[0], refs[1], atol=0, rtol=0)
    torch.testing.assert_close(refs[0], seen["policy"], atol=1e-4, rtol=0)  # the ref copy is the trained adapter
