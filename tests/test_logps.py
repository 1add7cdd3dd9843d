"""Sequence log-probs: equal to a naive per-token loop, unaffected by padding and batching, on every path."""

import torch

from fastdpo.batching import collate_concatenated
from fastdpo.logps import head_path_is_exact, sequence_logps, split_pairs
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


def test_response_only_head_equals_full_logits_in_value_and_gradient():
    model = tiny_llama(40)
    batch = collate_concatenated(PAIRS, 2)
    assert head_path_is_exact(model, batch)
    grads = []
    for fast in (True, False):
        model.zero_grad()
        logps, _ = sequence_logps(model, batch, head_only_responses=fast)
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        grads.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_prompt_and_padding_tokens_are_masked():
    batch = collate_concatenated(PAIRS[:2], pad_token_id=2)
    assert batch.input_ids.tolist() == [
        [0, 7, 8, 9, 10, 1, 2, 2], [0, 20, 21, 22, 23, 24, 25, 1],
        [0, 7, 8, 9, 11, 12, 13, 1], [0, 20, 26, 1, 2, 2, 2, 2]]
    assert batch.response_mask.tolist() == [
        [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 1, 0, 0], [1] * 8, [1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]
