"""Attention per segment (attention.py): the same log-probs and gradients as SDPA with the dense mask, in every
family and layout; used in wide rows only; checked at start-up against transformers' SDPA, and refused loudly by a
model that does not hand it the segments."""

import json
import random

import pytest
import torch

from conftest import tiny_llama
from test_checks import family
from test_logps import checked, saved_mask_storages

from fastdpo import attention
from fastdpo.batching import Layout, collate_packed
from fastdpo.logps import sequence_logps
from fastdpo.tokenize import TokenizedPair


def random_pairs(n: int, vocab: int, lengths=(1, 9), seed: int = 0) -> list[TokenizedPair]:
    """Pairs of random tokens (ids 3 and up), each part 1-9 tokens long: rows of several segments and padding."""
    rng = random.Random(seed)
    part = lambda: [rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))]  # noqa: E731
    return [TokenizedPair(part(), part(), part(), index=i) for i in range(n)]


def run(model, batch, per_segment: bool, calls: list | None = None):
    """Log-probs and gradients of a loss weighing each sequence differently, attending per segment or by the
    dense mask; `calls` collects how many attention calls got the segments."""
    attention.set_per_segment([model], per_segment)
    model.zero_grad()
    logps, _ = sequence_logps(model, batch, "chunked", chunk_size=7)
    (logps * torch.arange(1.0, 1 + logps.numel())).sum().backward()
    attention.set_per_segment([model], False)
    return logps.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.fixture
def every_width(monkeypatch):
    """Segments of any length attend per segment."""
    monkeypatch.setattr(attention, "MIN_SEGMENT", 1)


@pytest.fixture
def segment_calls(monkeypatch):
    """The number of attention calls that attended per segment."""
    calls = []
    original = attention.segment_attention

    def spy(*args, fastdpo_segments=None, **kwargs):
        calls.append(fastdpo_segments is not None)
        return original(*args, fastdpo_segments=fastdpo_segments, **kwargs)

    monkeypatch.setattr(attention, "segment_attention", spy)
    from transformers import AttentionInterface
    monkeypatch.setitem(AttentionInterface._global_mapping, attention.NAME, spy)
    attention.register()
    return calls


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2", "gemma", "mistral"])
@pytest.mark.parametrize("share, pack", [(True, True), (False, True), (True, False)])
def test_attention_per_segment_equals_the_dense_mask_in_value_and_gradient(name, share, pack, every_width,
                                                                           segment_calls):
    """Grouped-query heads (one K/V head for two), biased projections (Qwen2), Conv1D (GPT-2): per segment, the
    log-probs and every gradient equal SDPA's over the dense mask."""
    model = family(name, vocab=64).eval()  # GPT-2 has dropout
    model.set_attn_implementation("sdpa")
    batch = collate_packed(random_pairs(7, 64, seed=len(name)), 2, share_prompt=share, pack=pack, row_length=40)
    dense = run(model, batch, per_segment=False)
    assert not any(segment_calls)
    segmented = run(model, batch, per_segment=True)
    assert segment_calls and all(segment_calls[-model.config.num_hidden_layers:])
    torch.testing.assert_close(segmented[0], dense[0], atol=1e-5, rtol=0)
    for a, b in zip(segmented[1], dense[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_attention_per_segment_under_bf16_autocast_and_gradient_checkpointing(every_width, segment_calls):
    model = tiny_llama(40, layers=2)
    model.set_attn_implementation("sdpa")
    batch = collate_packed(random_pairs(5, 40), 2, share_prompt=True, pack=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = run(model, batch, per_segment=False)
        segmented = run(model, batch, per_segment=True)
    torch.testing.assert_close(segmented[0], dense[0], atol=2e-2, rtol=1e-2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    checkpointed = run(model, batch, per_segment=True)
    model.eval()
    plain = run(model, batch, per_segment=False)
    torch.testing.assert_close(checkpointed[0], plain[0], atol=1e-5, rtol=0)
    for a, b in zip(checkpointed[1], plain[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert segment_calls.count(True) == 2 + 2 * 2  # 2 layers: the autocast run, then forward and recompute


def test_long_segments_attend_per_segment_and_keep_no_dense_mask():
    """A batch whose segments average fewer than `MIN_SEGMENT` tokens takes the dense mask (one (R, 1, L, L)
    tensor kept for backward); at or above it, none at all, and the same log-probs."""
    model = tiny_llama(40)
    model.set_attn_implementation("sdpa")
    short = collate_packed(random_pairs(6, 40, lengths=(2, 30)), 2, row_length=256)
    n = attention.MIN_SEGMENT
    long = collate_packed(random_pairs(2, 40, lengths=(n // 3, n)) + random_pairs(2, 40, lengths=(20, 30)), 2)
    assert not attention.worth_it(short.segments) and attention.worth_it(long.segments)
    attention.set_per_segment([model], True)
    assert saved_mask_storages(model, short)[0] == 1
    assert saved_mask_storages(model, long)[0] == 0
    with torch.no_grad():
        segmented, _ = sequence_logps(model, long)
        attention.set_per_segment([model], False)
        dense, _ = sequence_logps(model, long)
    torch.testing.assert_close(segmented, dense, atol=1e-5, rtol=1e-6)  # sums of hundreds of nats


def test_the_start_up_check_keeps_per_segment_attention_where_it_is_exact():
    model = tiny_llama(40)
    model.set_attn_implementation("sdpa")
    notices = []
    layout = checked(model, random_pairs(4, 40), notice=notices.append)
    assert layout.per_segment and not notices and "attention per segment" in layout.describe()
    assert model.config._attn_implementation == "sdpa"  # the check leaves the model as it was
    model.set_attn_implementation("eager")  # applies to SDPA only: off without a notice
    assert not checked(model, random_pairs(4, 40), notice=notices.append).per_segment and not notices


def test_a_model_that_does_not_hand_on_the_segments_refuses_them_loudly():
    """A body that drops unknown keywords gets the placeholder mask, which cannot broadcast to the scores: the
    check says so and the run keeps the dense mask; it never attends to the whole row."""
    model = tiny_llama(40)
    model.set_attn_implementation("sdpa")
    original = model.model.forward
    model.model.forward = lambda *args, fastdpo_segments=None, **kwargs: original(*args, **kwargs)
    notices = []
    layout = checked(model, random_pairs(4, 40), notice=notices.append)
    assert kind_of(layout) == (True, True, False)
    assert "attention per segment cannot run on this model (RuntimeError" in notices[0]
    assert model.config._attn_implementation == "sdpa"


def test_per_segment_attention_that_gives_other_numbers_is_turned_off(monkeypatch):
    model = tiny_llama(40)
    model.set_attn_implementation("sdpa")
    original = attention.segment_attention

    def shifted(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        return out + 0.5 if kwargs.get("fastdpo_segments") else out, weights

    from transformers import AttentionInterface
    attention.register()
    monkeypatch.setitem(AttentionInterface._global_mapping, attention.NAME, shifted)
    notices = []
    layout = checked(model, random_pairs(4, 40), notice=notices.append)
    assert not layout.per_segment and layout.share_prompt and "plain path's log-probs" in notices[0]


def kind_of(layout: Layout) -> tuple:
    return layout.share_prompt, layout.pack, layout.per_segment


def test_eval_and_training_attend_per_segment_and_equal_the_dense_mask(tmp_path, capsys):
    """Through the CLI, on pairs of about 200 tokens a part: `sdpa` attends per segment (the start says so) and
    gives eager attention's per-pair numbers (the dense mask), and two training steps the same weights."""
    from conftest import assert_same_weights, run_cli, write_jsonl
    from fastdpo.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny")
    model = tmp_path / "policy"
    tiny_llama(len(tok), seed=1).save_pretrained(model)
    tok.save_pretrained(model)
    rows = [{"prompt": "Question: How do I cook rice?" * (20 + k), "chosen": " Sure, rinse it first." * (30 - k),
             "rejected": " No. Do it yourself." * (25 + k)} for k in range(4)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    per_pair = {}
    for impl in ("sdpa", "eager"):
        out = tmp_path / f"{impl}.jsonl"
        run_cli(["eval", "--model", str(model), "--ref_model", str(model), "--data", str(data), "--max_length",
                 "1024", "--attn_implementation", impl, "--per_pair_out", str(out)], capsys)
        assert ("attention per segment" in run_cli.last_stderr) == (impl == "sdpa")
        per_pair[impl] = [json.loads(line) for line in out.read_text().splitlines()]
        run_cli(["train", "--model", str(model), "--data", str(data), "--output_dir", str(tmp_path / impl),
                 "--max_length", "1024", "--attn_implementation", impl, "--max_steps", "2", "--batch_size", "2",
                 "--progress", "false"], capsys)
        assert ("attention per segment" in run_cli.last_stderr) == (impl == "sdpa")
    for a, b in zip(per_pair["sdpa"], per_pair["eager"]):
        for key in ("policy_chosen_logps", "policy_rejected_logps", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-4), key
    assert_same_weights(tmp_path / "sdpa", tmp_path / "eager", atol=1e-5)


# --- flash-attention's varlen kernels: packing without prefix sharing, by segment lengths --------------------------

def emulated_flash(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                   cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """flash-attention's contract, on the CPU: with a 2-D padding mask, causal attention over each row's real
    tokens (right padding); with varlen keywords, the (R, L) tokens flattened into one sequence and attention causal
    within each piece `cu_seq_lens` cuts; never a 4-D mask."""
    R, H, L, D = query.shape
    key, value = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (key, value))
    attend = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, scale=scaling)
    if attention_mask is not None:
        assert attention_mask.dim() == 2 and cu_seq_lens_q is None
        out = torch.zeros_like(query)
        for r, n in enumerate(attention_mask.sum(1).tolist()):
            out[r, :, :n] = attend(query[r : r + 1, :, :n], key[r : r + 1, :, :n], value[r : r + 1, :, :n])[0]
        return out.transpose(1, 2), None
    assert cu_seq_lens_q is cu_seq_lens_k and max_length_q == max_length_k
    # (R, H, L, D) -> (1, H, R L, D)
    q, k, v = (t.transpose(1, 2).reshape(R * L, H, D).transpose(0, 1)[None] for t in (query, key, value))
    bounds = cu_seq_lens_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == R * L and max_length_q == max(b - a for a, b in zip(bounds, bounds[1:]))
    parts = [attend(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :]) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts, dim=2)[0].transpose(0, 1).reshape(R, L, H, D), None


@pytest.fixture
def flash_on_cpu(monkeypatch):
    """A model set to "flash_emulated" attends through `emulated_flash` (transformers' flash mask rule: none)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_emulated", emulated_flash)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "flash_emulated",
                        ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    return "flash_emulated"


def test_varlen_cuts_the_flattened_rows_at_every_segment_and_at_each_rows_padding():
    """Rows of width 10: [4 | 5 | pad 1] and [7 | pad 3] -> cuts at 4, 9, 10, then 17, 20; the longest piece 7."""
    from fastdpo.attention import Segment

    segments = ((Segment(0, 4, 4, 0), Segment(4, 5, 5, 0)), (Segment(0, 7, 7, 0),))
    got = attention.varlen(segments, 2, 10, "cpu")
    assert got["cu_seq_lens_q"].tolist() == [0, 4, 9, 10, 17, 20] and got["cu_seq_lens_q"].dtype == torch.int32
    assert got["max_length_q"] == got["max_length_k"] == 7


def test_flash_attention_packs_by_segment_lengths_and_drops_prefix_sharing(flash_on_cpu):
    """With a flash implementation the start-up check turns prefix sharing off (one line) and keeps packing, whose
    rows go to the kernel as segment lengths without a mask: the plain path's log-probs and gradients."""
    from fastdpo.batching import collate_concatenated

    model = family("qwen2", vocab=64).eval()
    model.set_attn_implementation("sdpa")
    pairs = random_pairs(7, 64, seed=3)
    plain = run(model, collate_concatenated(pairs, 2), per_segment=False)
    model.config._attn_implementation = flash_on_cpu
    notices = []
    layout = checked(model, pairs, notice=notices.append)
    assert (layout.share_prompt, layout.pack) == (False, True) and len(notices) == 1
    assert "takes no 4-D mask, which prefix sharing needs; packing by segment lengths" in notices[0]
    packed = run(model, collate_packed(pairs, 2, share_prompt=False, pack=True, row_length=40), per_segment=False)
    torch.testing.assert_close(packed[0], plain[0], atol=1e-5, rtol=0)
    for a, b in zip(packed[1], plain[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_auto_attention_on_cuda_takes_flash_where_the_layout_needs_no_mask(monkeypatch):
    import transformers.utils

    from fastdpo.config import build_config
    from fastdpo.models import attention_implementation

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    base = ["--model", "builtin:tiny", "--data", "builtin:example"]
    assert attention_implementation(build_config(base + ["--prefix_sharing", "false"]), "cuda") == "flash_attention_2"
    assert attention_implementation(build_config(base), "cuda") == "flex_attention"
    assert attention_implementation(build_config(base + ["--prefix_sharing", "false"]), "cpu") == "sdpa"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert attention_implementation(build_config(base + ["--prefix_sharing", "false"]), "cuda") == "flex_attention"


def _flash_on_cuda() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return torch.cuda.is_available() and is_flash_attn_2_available()


@pytest.mark.skipif(not _flash_on_cuda(), reason="flash-attention's varlen kernels need CUDA and flash-attn; "
                                                  "not yet run on a GPU")
def test_flash_attention_training_on_cuda_equals_sdpa(tmp_path, capsys):
    from conftest import assert_same_weights, run_cli, write_jsonl
    from fastdpo.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny")
    model = tmp_path / "policy"
    tiny_llama(len(tok), seed=1).save_pretrained(model)
    tok.save_pretrained(model)
    rows = [{"prompt": "Question: How do I cook rice?" * (2 + k), "chosen": " Sure, rinse it first." * (3 + k),
             "rejected": " No. Do it yourself." * (1 + k)} for k in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    for impl in ("sdpa", "flash_attention_2"):
        run_cli(["train", "--model", str(model), "--data", str(data), "--output_dir", str(tmp_path / impl),
                 "--attn_implementation", impl, "--prefix_sharing", "false", "--precision", "bf16", "--max_steps",
                 "2", "--batch_size", "4", "--progress", "false"], capsys)
    assert_same_weights(tmp_path / "sdpa", tmp_path / "flash_attention_2", atol=1e-2)


class InductorError(RuntimeError):
    """Named as what torch.compile raises when it cannot build a kernel."""


def test_a_flex_backward_that_cannot_compile_restarts_the_step_with_sdpa(tmp_path, capsys, monkeypatch):
    """On CUDA torch.compile can fail to build FlexAttention's backward kernel for a shape, after some gradients
    have accumulated. Simulated (CPU has no flex backward): the first step's gradients accumulate, then the model
    is found set to flex_attention and an inductor error is raised. The step restarts from zero gradients with
    SDPA, one line says so, and the run equals one that never failed."""
    from conftest import assert_same_weights, run_cli, write_jsonl
    from fastdpo import training
    from fastdpo.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny")
    model = tmp_path / "policy"
    tiny_llama(len(tok), seed=1).save_pretrained(model)
    tok.save_pretrained(model)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Question: How do I cook rice?" * (1 + k),
                                               "chosen": " Sure, rinse it first." * (2 + k),
                                               "rejected": " No. Do it yourself."} for k in range(8)])
    args = lambda out: ["train", "--model", str(model), "--data", str(data), "--output_dir", str(out),  # noqa: E731
                        "--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "2", "--progress", "false"]
    run_cli(args(tmp_path / "plain"), capsys)
    real, calls = training._accumulate, []

    def failing_once(run, micro_batches):
        shares = real(run, micro_batches)
        calls.append(len(micro_batches))
        if len(calls) == 1:  # gradients Adam would not ignore (it is blind to their scale) are left behind
            for p in run.policy.parameters():
                p.grad.add_(torch.randn_like(p.grad))
            run.policy.config._attn_implementation = "flex_attention"
            raise InductorError("backward kernel: no valid triton config")
        return shares

    monkeypatch.setattr(training, "_accumulate", failing_once)
    run_cli(args(tmp_path / "restarted"), capsys)
    assert calls == [2, 2, 2]  # step 1 twice, then step 2
    assert "FlexAttention's kernel could not be compiled here (backward kernel" in run_cli.last_stderr
    assert_same_weights(tmp_path / "plain", tmp_path / "restarted", atol=1e-6)
