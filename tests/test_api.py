"""The Python API: `fastdpo.train(...)` and `fastdpo.evaluate(...)` with models and data in memory give what the
CLI gives on the same model and data saved to disk, with the CLI's checks and messages."""

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch

import fastdpo
from fastdpo.errors import UserError

from conftest import assert_same_weights, example_rows, model_and_pairs, run_cli, write_jsonl

datasets = pytest.importorskip("datasets", reason="the in-memory data sets need datasets (pip install -e '.[dev]')")

OPTIONS = dict(max_steps=3, batch_size=8, learning_rate=1e-3, lr_scheduler="constant", progress=False,
               adam_epsilon=1e-5)
FLAGS = ["--max_steps", "3", "--batch_size", "8", "--learning_rate", "1e-3", "--lr_scheduler", "constant",
         "--progress", "false", "--adam_epsilon", "1e-5"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root, model, data = model_and_pairs(tmp_path_factory, "api", seed=12, rows=20)
    heldout = write_jsonl(root / "heldout.jsonl", example_rows(6, "eval"))
    return root, model, data, heldout


@pytest.fixture(scope="module")
def cli_run(base, tmp_path_factory):
    root, model, data, heldout = base
    out = tmp_path_factory.mktemp("cli") / "out"
    from fastdpo.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            pytest.raises(SystemExit) as code:
        main(["train", "--model", model, "--data", data, "--eval_data", heldout, "--output_dir", str(out), *FLAGS])
    assert code.value.code == 0
    return out


def loaded(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("form", ["Dataset", "DatasetDict", "list of dicts"])
def test_training_from_memory_gives_the_cli_weights(base, cli_run, tmp_path, form):
    root, model_dir, data, heldout = base
    records = rows(data)
    source = {"Dataset": datasets.Dataset.from_list(records),
              "DatasetDict": datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}),
              "list of dicts": records}[form]
    model, tokenizer = loaded(model_dir)
    result = fastdpo.train(model=model, tokenizer=tokenizer, data=source, eval_data=rows(heldout),
                           output_dir=str(tmp_path / "out"), **OPTIONS)
    assert result.model is model and result.steps == 3
    assert_same_weights(cli_run, tmp_path / "out")
    cli_results = json.load(open(cli_run / "results.json"))
    assert result.eval_after == pytest.approx(cli_results["eval_after"], rel=1e-6)
    # the trained model in memory is the one saved
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "model.safetensors")
    for key, value in result.model.state_dict().items():
        if key in saved:
            torch.testing.assert_close(value, saved[key], atol=0, rtol=0)


def test_training_from_paths_equals_the_cli(base, cli_run, tmp_path):
    root, model_dir, data, heldout = base
    result = fastdpo.train(model=model_dir, data=data, eval_data=heldout, output_dir=str(tmp_path / "out"), **OPTIONS)
    assert_same_weights(cli_run, tmp_path / "out")
    assert result.eval_before["rewards/accuracies"] == 0.0 and result.eval_after is not None


def test_evaluate_from_memory_equals_the_eval_command(base, capsys):
    root, model_dir, data, heldout = base
    out = run_cli(["eval", "--model", model_dir, "--ref_model", model_dir, "--data", heldout, "--json"], capsys)
    expected = json.loads(out.strip().splitlines()[-1])
    model, tokenizer = loaded(model_dir)
    reference, _ = loaded(model_dir)
    result = fastdpo.evaluate(model=model, ref_model=reference, tokenizer=tokenizer,
                              data=datasets.Dataset.from_list(rows(heldout)))
    assert result.metrics == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert [r["index"] for r in result.rows] == list(range(6))


def test_the_saved_config_records_where_an_in_memory_model_came_from(base, tmp_path):
    import yaml

    root, model_dir, data, heldout = base
    model, tokenizer = loaded(model_dir)
    fastdpo.train(model=model, tokenizer=tokenizer, data=rows(data), output_dir=str(tmp_path / "out"), **OPTIONS)
    saved = yaml.safe_load(open(tmp_path / "out" / "config.yaml"))
    assert saved["model"] == model_dir and saved["data"] == "<list passed in memory>"


@pytest.mark.parametrize("keywords, message", [
    (dict(lr=1e-5), "fastdpo.train() got an unknown option 'lr'"),
    (dict(learning_rat=1e-5), "(did you mean learning_rate=?)"),
    (dict(beta=-1.0), "beta: must be > 0, got -1.0"),
    (dict(beta="high"), "beta: expected float, got 'high'"),
    (dict(loss="dpo"), "loss: unknown loss 'dpo'"),
    (dict(precision="fp8"), "precision: must be one of fp32, bf16, fp16"),
])
def test_bad_keywords_raise_the_one_line_error(base, tmp_path, keywords, message):
    root, model_dir, data, heldout = base
    with pytest.raises(UserError) as err:
        fastdpo.train(model=model_dir, data=data, output_dir=str(tmp_path / "out"), **keywords)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_in_memory_data_names_the_keyword_and_the_row(base, tmp_path):
    root, model_dir, data, heldout = base
    bad = rows(data)[:3] + [{"prompt": "a", "chosen": 7, "rejected": " b"}]
    with pytest.raises(UserError, match=r"data\[3\]: field 'chosen' must be text"):
        fastdpo.train(model=model_dir, data=bad, output_dir=str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"eval_data: no split 'test' \(it has \['dev'\]\); choose one with "
                                        r"eval_data_split="):
        fastdpo.train(model=model_dir, data=data, output_dir=str(tmp_path / "out"),
                      eval_data=datasets.DatasetDict({"dev": datasets.Dataset.from_list(rows(heldout))}))
    with pytest.raises(UserError, match="data: expected a path, a list of dicts"):
        fastdpo.train(model=model_dir, data={"prompt": "a"}, output_dir=str(tmp_path / "out"))


def test_a_model_in_memory_without_a_tokenizer_is_refused(base, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    root, model_dir, data, heldout = base
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UserError, match="a model passed in memory needs its tokenizer beside it"):
        fastdpo.train(model=model, data=data, output_dir=str(tmp_path / "out"))


def test_importing_fastdpo_loads_no_torch_and_the_api_comes_on_first_use():
    code = "import sys, fastdpo; before = 'torch' in sys.modules; print(before, fastdpo.train.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "fastdpo.api"]


def test_path_objects_are_paths_and_other_objects_are_refused_by_name(base, tmp_path):
    from pathlib import Path

    root, model_dir, data, heldout = base
    result = fastdpo.evaluate(model=Path(model_dir), ref_model=Path(model_dir), data=Path(heldout))
    assert result.metrics["pairs"] == 6
    with pytest.raises(UserError, match="model: expected a path, a hub id or a loaded model, got int"):
        fastdpo.train(model=123, data=data, output_dir=str(tmp_path / "out"))
    with pytest.raises(UserError, match="ref_model: expected a path, a hub id or a loaded model, got dict"):
        fastdpo.evaluate(model=model_dir, ref_model={}, data=heldout)
