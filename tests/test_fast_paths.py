"""Every fast path in training — precomputed reference, prefix sharing, packing, chunked logits, gradient
checkpointing, length grouping — gives the weights of the plain path; the reference cache is reused and keyed."""

import itertools
import json

import pytest
import torch

from fastdpo.config import build_config
from fastdpo.training import train

from conftest import assert_same_weights, example_rows, make_model_dir, write_jsonl

PLAIN = ["--reference", "copy", "--prefix_sharing", "false", "--packing", "false", "--logits_chunk_size", "0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    model = make_model_dir(root / "model", seed=4)
    rows = example_rows(12) + example_rows(4, "eval")
    data = write_jsonl(root / "pairs.jsonl", rows)
    heldout = write_jsonl(root / "heldout.jsonl", example_rows(6, "eval"))
    return root, model, data, heldout


def run(base, out, *flags):
    root, model, data, heldout = base
    return train(build_config(["--model", model, "--data", data, "--eval_data", heldout, "--output_dir", str(out),
                               "--learning_rate", "1e-3", "--max_steps", "2", "--batch_size", "8",
                               "--micro_batch_size", "4", "--progress", "false", "--ref_cache_dir",
                               str(root / "cache"), "--adam_epsilon", "1e-5", "--logging_steps", "1", *flags]))


def losses(path):
    return [json.loads(line)["loss"] for line in open(path / "metrics.jsonl") if '"loss"' in line
            and not line.startswith('{"step": 0')]


@pytest.fixture(scope="module")
def plain(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "out"
    result = run(base, out, *PLAIN)
    return out, result


COMBOS = list(itertools.product(("copy", "precomputed"), (False, True), (False, True), ("0", "7")))


@pytest.mark.parametrize("reference, share, pack, chunk", COMBOS)
def test_fast_path_training_equals_plain_training(base, plain, tmp_path, reference, share, pack, chunk):
    out = tmp_path / "out"
    result = run(base, out, "--reference", reference, "--prefix_sharing", str(share), "--packing", str(pack),
                 "--logits_chunk_size", chunk)
    assert_same_weights(out, plain[0], atol=1e-5)
    assert losses(out) == pytest.approx(losses(plain[0]), abs=1e-5)
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert result.eval_after[key] == pytest.approx(plain[1].eval_after[key], abs=1e-4)


def test_gradient_checkpointing_and_length_grouping_are_exact(base, plain, tmp_path):
    run(base, tmp_path / "ckpt", "--gradient_checkpointing")
    assert_same_weights(tmp_path / "ckpt", plain[0], atol=1e-5)
    # one batch of 8 out of 16 pairs per step: grouping changes which pairs, so compare against its own plain run
    run(base, tmp_path / "grouped", "--group_by_length", *PLAIN)
    run(base, tmp_path / "grouped_fast", "--group_by_length", "--reference", "precomputed")
    assert_same_weights(tmp_path / "grouped_fast", tmp_path / "grouped", atol=1e-5)


def test_reference_cache_is_reused_and_keyed_by_data_and_weights(base, tmp_path, capsys):
    root, model, data, heldout = base
    cache = tmp_path / "cache"

    def go(out, data_path=data, model_dir=model):
        train(build_config(["--model", model_dir, "--data", data_path, "--output_dir", str(out), "--max_steps",
                            "1", "--progress", "false", "--reference", "precomputed", "--ref_cache_dir",
                            str(cache)]))
        return capsys.readouterr().err

    assert "computed in" in go(tmp_path / "a")
    assert "loaded from the cache" in go(tmp_path / "b")
    assert len(list(cache.iterdir())) == 1
    other_data = write_jsonl(tmp_path / "other.jsonl", example_rows(10))
    assert "computed in" in go(tmp_path / "c", data_path=other_data)
    other_model = make_model_dir(tmp_path / "other_model", seed=9)
    assert "computed in" in go(tmp_path / "d", model_dir=other_model)
    assert len(list(cache.iterdir())) == 3


def test_bf16_autocast_keeps_logsoftmax_in_fp32(base, tmp_path):
    from fastdpo.batching import collate_packed
    from fastdpo.logps import sequence_logps
    from fastdpo.tokenize import TokenizedPair

    from conftest import tiny_llama

    model = tiny_llama(40)
    batch = collate_packed([TokenizedPair([0, 5, 6], [7, 1], [8, 9, 1], 0)], 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, _ = sequence_logps(model, batch, "chunked", 4)
        full, _ = sequence_logps(model, batch, "full")
    assert fast.dtype == full.dtype == torch.float32
    torch.testing.assert_close(fast, full, atol=0.05, rtol=0.01)
    result = run(base, tmp_path / "bf16", "--precision", "bf16", "--reference", "precomputed")
    assert torch.isfinite(torch.tensor(result.eval_after["loss"]))
