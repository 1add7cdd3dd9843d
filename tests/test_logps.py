"""Sequence log-probs: equal to a naive per-token loop, unaffected by padding and batching, on every path."""

import torch

import itertools

import pytest

from fastdpo.batching import Layout, bucket_width, collate_concatenated, collate_packed
from fastdpo.head import ChunkedHeadLogps
from fastdpo.logps import LogpsModule, check_layout, check_sample, sequence_logps, split_pairs
from fastdpo.tokenize import TokenizedPair

from conftest import tiny_llama

PAIRS = [
    TokenizedPair([0, 7, 8, 9], [10, 1], [11, 12, 13, 1], index=0),
    TokenizedPair([0, 20], [21, 22, 23, 24, 25, 1], [26, 1], index=1),
    TokenizedPair([0, 30, 31, 32, 33, 14, 15], [16, 1], [17, 18, 1], index=2),
]


def naive_logps(model, prompt, response):
    """sum_t log p(response[t] | prompt + response[:t]), one forward per token, no batching, no masks."""
    total = 0.0
    with torch.no_grad():
        for t, token in enumerate(response):
            context = torch.tensor([prompt + response[:t]])
            logits = model(input_ids=context).logits[0, -1].double()
            total += torch.log_softmax(logits, -1)[token].item()
    return total


def test_logps_equal_a_naive_per_token_loop():
    model = tiny_llama(40)
    batch = collate_concatenated(PAIRS, pad_token_id=2)
    with torch.no_grad():
        logps, tokens = sequence_logps(model, batch)
    chosen, rejected = split_pairs(logps)
    for i, pair in enumerate(PAIRS):
        assert abs(chosen[i].item() - naive_logps(model, pair.prompt_ids, pair.chosen_ids)) < 1e-4
        assert abs(rejected[i].item() - naive_logps(model, pair.prompt_ids, pair.rejected_ids)) < 1e-4
    assert tokens.tolist() == [2, 6, 2, 4, 2, 3]


def test_concatenated_forward_equals_separate_forwards():
    model = tiny_llama(40)
    with torch.no_grad():
        joint, _ = sequence_logps(model, collate_concatenated(PAIRS, 2))
        chosen_only = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.chosen_ids, p.index) for p in PAIRS]
        rejected_only = [TokenizedPair(p.prompt_ids, p.rejected_ids, p.rejected_ids, p.index) for p in PAIRS]
        chosen, _ = split_pairs(sequence_logps(model, collate_concatenated(chosen_only, 2))[0])
        rejected, _ = split_pairs(sequence_logps(model, collate_concatenated(rejected_only, 2))[0])
    torch.testing.assert_close(joint, torch.cat([chosen, rejected]), atol=1e-5, rtol=0)


def test_padding_and_batch_mates_do_not_change_a_pairs_logps():
    model = tiny_llama(40)
    with torch.no_grad():
        together, _ = sequence_logps(model, collate_concatenated(PAIRS, 2))
        alone = [sequence_logps(model, collate_concatenated([p], 2))[0] for p in PAIRS]
    chosen, rejected = split_pairs(together)
    torch.testing.assert_close(chosen, torch.stack([a[0] for a in alone]), atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, torch.stack([a[1] for a in alone]), atol=1e-5, rtol=0)


LAYOUTS = [(share, pack, head) for share, pack in itertools.product((False, True), repeat=2)
           for head in ("full", "chunked")]


def collate(pairs, share, pack, row_length=0):
    if share or pack:
        return collate_packed(pairs, 2, share_prompt=share, pack=pack, row_length=row_length)
    return collate_concatenated(pairs, 2)


@pytest.mark.parametrize("share, pack, head", LAYOUTS)
def test_every_fast_path_equals_the_plain_path_in_value_and_gradient(share, pack, head):
    """Prefix sharing, packing and the chunked response-only head, in every combination, against the
    concatenated layout through the model's full logits: the same log-probs (1e-5) and the same gradients."""
    model = tiny_llama(40)
    weights = torch.arange(1.0, 7.0)  # a loss that weighs each sequence differently

    def run(batch, head, chunk):
        model.zero_grad()
        logps, counts = sequence_logps(model, batch, head, chunk_size=chunk)
        (logps * weights).sum().backward()
        return logps.detach(), counts, [p.grad.clone() for p in model.parameters()]

    plain = run(collate_concatenated(PAIRS, 2), "full", 1024)
    fast = run(collate(PAIRS, share, pack, row_length=24), head, 5)  # chunks of 5 split sequences
    torch.testing.assert_close(fast[0], plain[0], atol=1e-5, rtol=0)
    assert fast[1].tolist() == plain[1].tolist() == [2, 6, 2, 4, 2, 3]
    for a, b in zip(fast[2], plain[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packing_fills_rows_and_removes_padding():
    batch = collate_packed(PAIRS, 2, share_prompt=False, pack=True, row_length=16)
    plain = collate_concatenated(PAIRS, 2)
    assert batch.input_ids.shape[0] < plain.input_ids.shape[0]
    assert batch.padding_share < plain.padding_share


def test_packed_rows_are_rounded_up_to_eight_widths_per_power_of_two():
    """Few distinct shapes per run (kernels are cached per shape), at most 1/8 padding, never past a row_length
    that holds the row."""
    assert [bucket_width(n) for n in (1, 8, 9, 17, 237, 1000, 1025)] == [1, 8, 9, 18, 240, 1024, 1152]
    assert bucket_width(1990, row_length=2000) == 2000 and bucket_width(3000, row_length=2000) == 3072
    widths = {bucket_width(n) for n in range(129, 257)}
    assert len(widths) == 8 and all((w - n) / n <= 1 / 8 for n in range(1, 5000) for w in [bucket_width(n)])
    # 6 real tokens -> width 6; 3 pairs of 7 -> 7; 9 tokens -> 9; 17 -> 18 (one padding slot, masked, not scored)
    batch = collate_packed([TokenizedPair(list(range(1, 9)), [10, 11, 12, 13, 14], [15, 16, 17, 18], index=0)], 2)
    assert batch.input_ids.shape == (1, 18) and batch.position_ids[0, -1] == -1
    assert batch.score_labels.tolist() == [10, 11, 12, 13, 14, 15, 16, 17, 18]


def test_prefix_shared_segment_mask_and_positions():
    """[prompt 0 7 | chosen 10 1 | rejected 11 1]: the rejected tokens see the prompt and themselves, not the
    chosen tokens; their positions restart after the prompt; the first rejected token is scored from the last
    prompt token (column 1)."""
    batch = collate_packed([TokenizedPair([0, 7], [10, 1], [11, 1], index=0)], 2, share_prompt=True, pack=False)
    assert batch.input_ids.tolist() == [[0, 7, 10, 1, 11, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 3]]
    assert batch.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 1, 1]]
    assert batch.score_cols.tolist() == [1, 2, 1, 4]
    assert batch.score_labels.tolist() == [10, 1, 11, 1]
    assert batch.score_seq.tolist() == [0, 0, 1, 1]


def kind(layout: Layout) -> tuple:
    return layout.share_prompt, layout.pack, layout.head


def checked(model, sample, notice, **requested) -> Layout:
    """The layout the start-up check chooses for `model` (pad id 2, on the CPU)."""
    return check_layout(model, Layout(**requested), sample, 2, "cpu", notice=notice)


def body_forward_with_4d_masks(model, replacement):
    """Make the model's body call `replacement(mask)` on a 4-D attention mask: it returns the mask to use, or
    raises (a model that cannot take such a mask)."""
    body, original = model.model, model.model.forward

    def forward(*args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = replacement(attention_mask)
        return original(*args, attention_mask=attention_mask, **kwargs)

    body.forward = forward


def test_scorer_falls_back_where_the_model_cannot_take_the_mask():
    model = tiny_llama(40)
    layout = checked(model, PAIRS, notice=lambda text: None)
    assert kind(layout) == (True, True, "chunked")
    body_forward_with_4d_masks(model, lambda mask: None)  # a model that ignores 4-D masks (causal over the row)
    notices = []
    layout = checked(model, PAIRS, notice=notices.append)
    assert kind(layout) == (False, False, "chunked") and "concatenated layout" in notices[0]


def test_a_model_that_refuses_a_4d_mask_falls_back_with_its_error_in_the_notice():
    def refuse(mask):
        raise RuntimeError("Attention mask should be of size (1, 1, 24, 24)")

    model = tiny_llama(40)
    body_forward_with_4d_masks(model, refuse)
    notices = []
    layout = checked(model, PAIRS, notice=notices.append)
    assert kind(layout) == (False, False, "chunked")
    assert "RuntimeError: Attention mask should be of size" in notices[0] and len(notices) == 1


@pytest.mark.parametrize("error", [AttributeError, TypeError, KeyError, IndexError])
def test_a_bug_in_a_fast_path_surfaces_instead_of_becoming_a_fallback(error):
    """Only the failures a model that cannot take a 4-D mask raises are caught; anything else is a bug."""
    def broken(mask):
        raise error("a bug")

    model = tiny_llama(40)
    body_forward_with_4d_masks(model, broken)
    with pytest.raises(error, match="a bug"):
        checked(model, PAIRS, notice=pytest.fail)


def test_a_model_without_a_plain_head_structure_gets_its_full_logits(monkeypatch):
    """No output embedding module to run the chunked head with: a notice and the model's own logits."""
    model = tiny_llama(40)
    monkeypatch.setattr(model, "get_output_embeddings", lambda: None)
    notices = []
    layout = checked(model, PAIRS, notice=notices.append)
    assert kind(layout) == (True, True, "full") and "no output embedding module" in notices[0]
    plain, _ = sequence_logps(model, collate_concatenated(PAIRS, 2), "full")
    fast, _ = sequence_logps(model, layout.collate(PAIRS, 2), layout.head)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_a_bug_in_the_chunked_head_surfaces(monkeypatch):
    model = tiny_llama(40)
    wrong = torch.nn.Linear(7, 40, bias=False)  # an lm_head whose input size is not the model's hidden size
    monkeypatch.setattr(model, "get_output_embeddings", lambda: wrong)
    with pytest.raises(RuntimeError):
        checked(model, PAIRS, notice=pytest.fail)


def test_exactness_checks_take_the_shortest_and_longest_pair_and_compare_them_cut_short():
    pairs = [TokenizedPair([0] + list(range(3, 3 + n)), list(range(40, 40 + n)) + [1], list(range(60, 60 + n)) + [1],
                           index=n) for n in (30, 5, 40, 12)]
    assert [p.index for p in check_sample(pairs)] == [5, 40]
    # the longest single sequence can be in a pair that is not the longest overall: it is added
    uneven = TokenizedPair([0, 3], list(range(100, 169)) + [1], [1], index=99)  # 2 + 70 tokens: 73 < 93 in all
    assert [p.index for p in check_sample(pairs[:2] + [uneven])] == [5, 30, 99]
    widths = []  # (path, row width) of every forward the check runs: the full model's, then every body's
    model = tiny_llama(100)
    model.register_forward_pre_hook(lambda m, a, kw: widths.append(("full", kw["input_ids"].shape[1])),
                                    with_kwargs=True)
    model.model.register_forward_pre_hook(lambda m, a, kw: widths.append(("body", kw["input_ids"].shape[1])),
                                          with_kwargs=True)
    layout = checked(model, check_sample(pairs), notice=pytest.fail, chunk_size=7)
    assert kind(layout) == (True, True, "chunked")
    assert [w for head, w in widths if head == "full"] == [32]  # 16 + 16 tokens, not 41 + 41
    assert max(w for head, w in widths) <= 16 * 3  # the layouts too: the shared row is 16 + 16 + 16


@pytest.mark.parametrize("window", [4, 64])
def test_sliding_window_shorter_than_the_data_turns_the_mask_layouts_off(window):
    """A 4-D mask replaces the model's own, its sliding window included: where the window binds (4 < 10 tokens)
    the shared layout would differ from the plain path, so the check falls back; where it cannot (64) it stays."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                           bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    notices = []
    layout = checked(model, PAIRS, notice=notices.append)
    plain, _ = sequence_logps(model, collate_concatenated(PAIRS, 2), "full")
    shared, _ = sequence_logps(model, collate(PAIRS, True, True), "chunked")
    if window == 4:
        assert kind(layout) == (False, False, "chunked") and "sliding windows of 4 tokens" in notices[0]
        assert not torch.allclose(shared, plain, atol=1e-4)  # why: the window is lost in the shared layout
    else:
        assert kind(layout) == (True, True, "chunked") and notices == []
        torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)


def test_length_limits_are_read_from_each_kind_of_config():
    """(sequence, segment, row) = the longest sequence, prefix-shared segment and row of the data."""
    from types import SimpleNamespace as C

    from fastdpo.logps import length_limit

    assert "sliding windows of 4096" in length_limit(C(sliding_window=4096), 5000, 9000, 9000)  # Mistral v0.1
    assert length_limit(C(sliding_window=4096), 4096, 9000, 9000) is None  # no sequence longer than the window
    assert length_limit(C(sliding_window=None), 5000, 9000, 9000) is None  # Mistral v0.2+
    assert length_limit(C(sliding_window=4096, use_sliding_window=False), 5000, 9000, 9000) is None  # Qwen2
    assert length_limit(C(sliding_window=512, layer_types=["sliding_attention", "full_attention"]), 600, 600, 600)
    assert length_limit(C(sliding_window=512, layer_types=["full_attention"]), 600, 600, 600) is None
    assert "chunks of 8192" in length_limit(
        C(attention_chunk_size=8192, layer_types=["chunked_attention", "full_attention"]), 9000, 9000, 9000)
    assert "position 8192" in length_limit(C(attn_temperature_tuning=True, floor_scale=8192), 5000, 8000, 9000)
    gpt_neo = C(model_type="gpt_neo", attention_layers=["global", "local"], window_size=256)
    assert length_limit(gpt_neo, 200, 300, 300) and length_limit(gpt_neo, 200, 250, 600) is None
    nested = C(get_text_config=lambda decoder: C(sliding_window=1024, layer_types=["sliding_attention"]))  # Gemma 3
    assert "1024" in length_limit(nested, 2000, 2000, 2000)
    assert length_limit(C(), 10**6, 10**6, 10**6) is None  # Llama


def test_eager_attention_gets_an_additive_mask():
    model = tiny_llama(40)
    with torch.no_grad():
        sdpa, _ = sequence_logps(model, collate(PAIRS, True, True))
        model.config._attn_implementation = "eager"
        eager, _ = sequence_logps(model, collate(PAIRS, True, True))
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)


def test_prompt_and_padding_tokens_are_masked():
    batch = collate_concatenated(PAIRS[:2], pad_token_id=2)
    assert batch.input_ids.tolist() == [
        [0, 7, 8, 9, 10, 1, 2, 2], [0, 20, 21, 22, 23, 24, 25, 1],
        [0, 7, 8, 9, 11, 12, 13, 1], [0, 20, 26, 1, 2, 2, 2, 2]]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 1, 0, 0], [1] * 8, [1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]
    # each response token is scored from the position before it, in its own row
    assert batch.score_rows.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert batch.score_cols.tolist() == [3, 4, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 1, 2]
    assert batch.score_labels.tolist() == [10, 1, 21, 22, 23, 24, 25, 1, 11, 12, 13, 1, 26, 1]
    assert batch.score_seq.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]


def test_chunked_head_with_a_frozen_lm_head_gives_the_same_hidden_gradients():
    model = tiny_llama(40)
    batch = collate(PAIRS, True, True)
    grads = []
    for frozen in (False, True):
        model.zero_grad()
        model.lm_head.weight.requires_grad_(not frozen)
        logps, _ = sequence_logps(model, batch, "chunked", chunk_size=5)
        logps.sum().backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
        assert (model.lm_head.weight.grad is None) == frozen
    torch.testing.assert_close(grads[0], grads[1])


def _plain_head_logps(hidden, weight, bias, labels):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()  # (M, V)
    return torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)


@pytest.mark.parametrize("confident", [False, True])
def test_chunked_head_equals_autograd_of_the_full_log_softmax(confident):
    """Values and all three gradients (hidden, weight, bias) against plain autograd in float32; `confident` gives
    the labels probabilities of about 0.999, where the small 1 - p must not be lost."""
    torch.manual_seed(0)
    M, H, V = 11, 12, 17
    hidden, weight, bias = torch.randn(M, H), torch.randn(V, H) * 0.1, torch.randn(V) * 0.1
    labels = torch.randperm(V)[:M]
    if confident:  # row i's hidden is ~e_i and its label's weight row 10 e_i: the label logit leads by ~10
        hidden = torch.eye(M, H) + 0.01 * hidden
        weight[labels] += 10 * torch.eye(M, H)
    grad_out = torch.randn(M)
    results = []
    for fn in (_plain_head_logps, lambda h, w, b, y: ChunkedHeadLogps.apply(h, w, b, y, 4)):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        out = fn(h, w, b, labels)
        out.backward(grad_out)
        results.append((out.detach(), h.grad, w.grad, b.grad))
    if confident:
        assert 0.99 < results[0][0].exp().min() and results[0][0].exp().max() < 0.9999
    for plain, chunked in zip(*results):
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [4, 16])
def test_chunked_head_in_bf16_matches_float32_to_bf16_accuracy(chunk):
    """Values and the hidden, weight and bias gradients under bf16 autocast (the weight gradient goes through a bf16
    (V, H) partial product per chunk, summed in float32) against the float32 path: several chunks with a partial
    last one (4), and one chunk holding every row (16)."""
    torch.manual_seed(0)
    M, H, V = 11, 32, 50
    hidden, weight, bias = torch.randn(M, H), torch.randn(V, H) * 0.1, torch.randn(V) * 0.1
    labels, grad_out = torch.randint(0, V, (M,)), torch.randn(M)
    results = []
    for autocast in (False, True):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = ChunkedHeadLogps.apply(h, w, b, labels, chunk)
        out.backward(grad_out)
        results.append((out.detach(), h.grad, w.grad, b.grad))
    for full, low in zip(*results):
        assert low.dtype == torch.float32
        assert (low - full).norm() / full.norm() < 2e-2
    # the values: bf16 logits, then a float32 log-softmax (a bf16 log-softmax would be ~1e-2 off)
    logits = torch.nn.functional.linear(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()).float()
    expected = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(results[1][0], expected, rtol=1e-5, atol=1e-5)


def test_chunked_head_in_bf16_keeps_a_confident_tokens_gradient():
    """Under bf16 autocast the softmax is stored in bf16; the label entry is set to p - 1 from the float32 output,
    so a token with p = 0.999 still gets the gradient (1 - p) * W[label] - ... to bf16 accuracy (not 2**-8 / 1e-3
    = 400% off, which is what rounding p to bf16 before subtracting 1 would give)."""
    torch.manual_seed(0)
    M, H, V = 8, 16, 64
    hidden = torch.eye(M, H) + 0.01 * torch.randn(M, H)  # row i ~ e_i
    weight = torch.randn(V, H) * 0.1
    labels = torch.randperm(V)[:M]
    weight[labels] += 11 * torch.eye(M, H)  # the label logit leads by ~11
    grads = []
    for autocast in (False, True):
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = ChunkedHeadLogps.apply(h, weight, None, labels, 3)
        out.sum().backward()
        grads.append(h.grad)
    assert 0.99 < out.exp().min() and out.exp().max() < 0.9999
    rel = (grads[1] - grads[0]).norm(dim=-1) / grads[0].norm(dim=-1)
    assert rel.max() < 0.05, rel


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_head_with_no_rows_gives_zero_weight_gradient(autocast):
    weight = torch.randn(50, 32, requires_grad=True)
    hidden = torch.randn(0, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = ChunkedHeadLogps.apply(hidden, weight, None, torch.zeros(0, dtype=torch.long), 4)
    out.sum().backward()
    assert out.shape == (0,) and torch.equal(weight.grad, torch.zeros(50, 32))


def test_llama4_text_model_gets_the_chunked_head_and_exact_logps():
    """Llama4ForCausalLM's base_model_prefix names the multimodal model's attribute; its body is `model`. The
    check must still find it (no fallback to full logits), and the fast path must match a per-token loop."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(vocab_size=40, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=2, attention_chunk_size=64, bos_token_id=0, eos_token_id=1,
                              pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config).eval()
    layout = checked(model, PAIRS, notice=pytest.fail)
    assert kind(layout) == (True, True, "chunked")
    with torch.no_grad():
        chosen, rejected = split_pairs(LogpsModule(model, layout)(layout.collate(PAIRS, 2))[0])
    for i, pair in enumerate(PAIRS):
        assert abs(chosen[i].item() - naive_logps(model, pair.prompt_ids, pair.chosen_ids)) < 1e-4
        assert abs(rejected[i].item() - naive_logps(model, pair.prompt_ids, pair.rejected_ids)) < 1e-4


def saved_mask_storages(model, batch, dtype=None) -> tuple[int, set]:
    """The number of distinct storages of (L, L)-sized tensors autograd keeps for backward in one forward (the
    attention masks), and their dtypes."""
    R, L = batch.input_ids.shape
    storages, dtypes = set(), set()

    def pack(t):
        if t.dim() == 4 and t.shape[:2] == (R, 1) and t.shape[-2:] == (L, L):  # (R, 1, L, L)
            storages.add(t.untyped_storage().data_ptr())
            dtypes.add(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        logps, _ = sequence_logps(model, batch)
    logps.sum().backward()
    return len(storages), dtypes


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_one_mask_per_forward_whatever_the_number_of_layers(dtype):
    """The 4-D mask is built once per forward, on the device, in the dtype attention computes in, and every
    layer uses that one tensor: what autograd keeps of it does not grow with the layers."""
    batch = collate_packed(PAIRS, 2, share_prompt=True, pack=True)
    for layers in (1, 4):
        model = tiny_llama(40, layers=layers)
        count, dtypes = saved_mask_storages(model, batch, dtype)
        assert count == 1 and dtypes == {dtype or torch.float32}, (layers, count, dtypes)


def test_flex_attention_with_the_layouts_block_mask_gives_the_sdpa_log_probs():
    """Prefix-shared, packed and both: the BlockMask built from the batch's (R, L) vectors masks what the dense
    mask masks (forward only: torch has no flex backward on CPU)."""
    model = tiny_llama(40)
    for share, pack in ((True, True), (False, True), (True, False)):
        batch = collate_packed(PAIRS, 2, share_prompt=share, pack=pack)
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            sdpa, _ = sequence_logps(model, batch)
            model.set_attn_implementation("flex_attention")
            flex, _ = sequence_logps(model, batch)
        torch.testing.assert_close(flex, sdpa, atol=1e-4, rtol=1e-5, msg=f"share {share}, pack {pack}")


def block_sets(mask, count: str, indices: str) -> list:
    """A BlockMask's listed kv blocks, as a set per (row, query block)."""
    n, idx = getattr(mask, count), getattr(mask, indices)
    return [[set(idx[r, 0, q, : n[r, 0, q]].tolist()) for q in range(n.shape[2])] for r in range(n.shape[0])]


@pytest.mark.parametrize("rows_per_pass", [128, 384, 1024])
def test_the_block_mask_classifies_the_blocks_as_flex_attention_does_without_the_full_grid(rows_per_pass):
    """Short and long pairs, packed several a row and one a row, widths that are not a multiple of 128: the
    BlockMask built a few query blocks at a time lists the same partial and full blocks as torch's
    create_block_mask over the whole (L, L) grid."""
    from torch.nn.attention.flex_attention import create_block_mask

    from test_attention import random_pairs

    for n, lengths, row_length in ((6, (2, 30), 0), (8, (50, 200), 0), (40, (20, 100), 1024), (3, (300, 500), 0)):
        batch = collate_packed(random_pairs(n, 40, lengths=lengths, seed=n), 2, row_length=row_length)
        dense = batch.dense_mask()[:, 0]  # (R, L, L)
        R, L = dense.shape[:2]
        expected = create_block_mask(lambda b, h, q, k: dense[b, q, k], R, None, L, L, device="cpu")
        built = batch.block_mask(rows_per_pass)
        assert built.shape == expected.shape == (R, 1, L, L)
        for count, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
            assert block_sets(built, count, indices) == block_sets(expected, count, indices), (n, count)
