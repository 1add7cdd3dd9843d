"""Exact token ids for every record form and tokenizer kind, and every truncation rule, counted."""

import pytest

from fastdpo.data import Record
from fastdpo.tokenize import TokenizeStats, encode_record, tokenize_records, truncate_pair

from conftest import ids, word_tokenizer

EOS = 1


def text(prompt, chosen, rejected):
    return Record(prompt, chosen, rejected, where="t:1")


def test_text_record_with_bos_tokenizer(tok):
    prompt, chosen, rejected, _ = encode_record(text("The sky is", " blue", " green"), tok)
    assert prompt == ids("<s>", "The", "sky", "is")
    assert chosen == ids("blue", "</s>")
    assert rejected == ids("green", "</s>")


def test_text_record_without_bos(tok_nobos):
    prompt, chosen, rejected, _ = encode_record(text("The sky is", " blue", " green"), tok_nobos)
    assert prompt == ids("The", "sky", "is")
    assert chosen == ids("blue", "</s>")


def test_eos_not_doubled_and_bos_at_most_once(tok):
    prompt, chosen, _, _ = encode_record(text("<s> The sky is", " blue </s>", " green"), tok)
    assert prompt == ids("<s>", "The", "sky", "is")
    assert chosen == ids("blue", "</s>")


def test_chat_record_uses_the_template_and_keeps_the_prompt_a_prefix(tok):
    user = [{"role": "user", "content": "What colour is the sky ?"}]
    record = Record(user, [{"role": "assistant", "content": "blue"}], [{"role": "assistant", "content": "green"}],
                    where="t:1")
    prompt, chosen, rejected, mismatches = encode_record(record, tok)
    assert prompt == tok("<|user|> What colour is the sky ? <|end|> <|assistant|>")["input_ids"]
    assert chosen == ids("blue", "<|end|>", "</s>")  # the template's end of turn, then the EOS it lacked
    assert rejected == ids("green", "<|end|>", "</s>")
    assert mismatches == 0


def test_implicit_prompt_text_record_ids(tok):
    from fastdpo.data import Fields, parse_record

    record = parse_record({"chosen": "The sky is blue", "rejected": "The sky is black"}, Fields(), "t:1")
    prompt, chosen, rejected, _ = encode_record(record, tok)
    assert prompt == ids("<s>", "The", "sky", "is")
    assert chosen == ids("blue", "</s>") and rejected == ids("black", "</s>")


def test_boundary_mismatch_keeps_prompt_whole():
    """A chat template that renders the prompt differently alone: prompt ids kept, response tokenized apart."""
    tok = word_tokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    record = Record([{"role": "user", "content": "The sky is"}], [{"role": "assistant", "content": "blue"}],
                    [{"role": "assistant", "content": "green"}], where="t:1")
    prompt, chosen, rejected, mismatches = encode_record(record, tok)
    assert prompt == ids("<s>", "The", "sky", "is", "<|assistant|>")
    assert chosen == ids("blue", "</s>") and rejected == ids("green", "</s>")
    assert mismatches == 1


def test_prompt_truncation_keeps_its_end_and_bos():
    stats = TokenizeStats()
    prompt, chosen, rejected = truncate_pair([0, 10, 11, 12, 13], [20, 1], [21, 1], max_length=10,
                                             max_prompt_length=3, stats=stats, bos_id=0)
    assert prompt == [0, 12, 13] and chosen == [20, 1] and stats.truncated_prompts == 1


def test_responses_keep_their_start():
    stats = TokenizeStats()
    prompt, chosen, rejected = truncate_pair([0, 5], [20, 21, 22, 1], [30, 1], max_length=4,
                                             max_prompt_length=3, stats=stats, bos_id=0)
    assert chosen == [20, 21] and rejected == [30, 1]
    assert (stats.truncated_chosen, stats.truncated_rejected) == (1, 0)


def test_pair_whose_prompt_leaves_no_room_is_dropped_and_counted():
    stats = TokenizeStats()
    assert truncate_pair([0, 5, 6, 7], [20, 1], [21, 1], max_length=3, max_prompt_length=8, stats=stats,
                         bos_id=0) is None
    assert stats.dropped_no_room == 1


def test_pairs_identical_after_truncation_are_dropped():
    stats = TokenizeStats()
    assert truncate_pair([0, 5], [20, 21, 1], [20, 22, 1], max_length=3, max_prompt_length=8, stats=stats) is None
    assert stats.dropped_identical == 1


def test_summary_line_counts_every_change(tok):
    records = [text("The sky is", " blue", " green"), text("The sky is", " blue", " blue"),
               text("a b c d e f g", " hot", " cold"), text("It is", " hot cold hot cold", " no")]
    pairs, stats = tokenize_records(records, tok, max_length=6, max_prompt_length=6)
    assert [p.index for p in pairs] == [0, 3]
    assert pairs[1].chosen_ids == ids("hot", "cold", "hot")  # 6 - len([<s>, It, is])
    assert stats.dropped_identical == 1 and stats.dropped_no_room == 1 and stats.truncated_prompts == 1
    line = stats.summary()
    assert "4 records -> 2 pairs" in line and "1 prompts" in line and "\n" not in line


@pytest.mark.parametrize("add_bos", [True, False])
def test_prompt_ids_are_a_prefix_of_joint_tokenization(add_bos):
    tok = word_tokenizer(add_bos=add_bos)
    prompt, chosen, _, mismatches = encode_record(text("What colour is the sky ?", " It is blue .", " no"), tok)
    joint = tok("What colour is the sky ? It is blue .")["input_ids"]
    assert prompt + chosen[:-1] == joint and mismatches == 0


@pytest.mark.parametrize("add_bos", [True, False])
def test_chat_and_implicit_records_on_both_tokenizer_kinds(add_bos):
    """The chat template writes its own BOS, so chat ids are the same for both kinds; implicit text prompts get
    the tokenizer's BOS only when it adds one."""
    from fastdpo.data import Fields, parse_record

    tok = word_tokenizer(add_bos=add_bos)
    user = [{"role": "user", "content": "What colour is the sky ?"}]
    chat = Record(user, [{"role": "assistant", "content": "blue"}], [{"role": "assistant", "content": "no"}], "t")
    prompt, chosen, rejected, mismatches = encode_record(chat, tok)
    assert prompt == ids("<s>", "<|user|>", "What", "colour", "is", "<unk>", "sky", "?", "<|end|>", "<|assistant|>")
    assert chosen == ids("blue", "<|end|>", "</s>") and rejected == ids("no", "<|end|>", "</s>")
    implicit = parse_record({"chosen": "It is hot", "rejected": "It is cold"}, Fields(), "t")
    prompt, chosen, rejected, _ = encode_record(implicit, tok)
    assert prompt == (ids("<s>") if add_bos else []) + ids("It", "is")
    assert chosen == ids("hot", "</s>") and rejected == ids("cold", "</s>")
