"""The split prompt path: for every tokenizer shape `prefix_stable` accepts, a prompt tokenized as its head and
tail gives exactly the ids of the plain path, on random text; every shape it must not accept is refused."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fastdpo.data import Record
from fastdpo.tokenize import SPLIT_PATTERNS, encode_record, encode_records, prefix_stable

CORPUS = ["The sky is blue and the grass is green.", "What colour is it? It is 42, or 7 at most!",
          "Café déjà vu: naïve façade, 東京 and 大阪.", "Answer:\nYes. No.\n\nMaybe  twice   spaced",
          "numbers 123 4567 89, words_with_underscores and don't can't won't"] * 20
LLAMA3, QWEN2 = sorted(SPLIT_PATTERNS, key=lambda p: "{1,3}" not in p)


def fast(backend: Tokenizer, bos: bool = True) -> PreTrainedTokenizerFast:
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                               special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_end|>"])


def trained(model, trainer, pre_tokenizer, normalizer=None, decoder=None) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    if decoder:
        tok.decoder = decoder
    tok.train_from_iterator(CORPUS, trainer)
    return tok


SPECIALS = ["<s>", "</s>", "<unk>", "<|im_end|>"]


def bpe(pre_tokenizer, normalizer=None, byte_level=True, **kw) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    return trained(models.BPE(unk_token=None if byte_level else "<unk>", **kw),
                   trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=alphabet),
                   pre_tokenizer, normalizer, decoders.ByteLevel() if byte_level else None)


def split(pattern):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


ACCEPTED = {
    "gpt2 byte-level BPE": lambda: bpe(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "byte-level BPE with a prefix space": lambda: bpe(pre_tokenizers.ByteLevel(add_prefix_space=True)),
    "qwen2 (NFC, split regex, bytes)": lambda: bpe(split(QWEN2), normalizers.NFC()),
    "llama 3 (split regex, bytes)": lambda: bpe(split(LLAMA3)),
    "word level, whitespace and punctuation": lambda: trained(
        models.WordLevel(unk_token="<unk>"), trainers.WordLevelTrainer(special_tokens=SPECIALS),
        pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])),
    "metaspace BPE that splits": lambda: bpe(pre_tokenizers.Metaspace(split=True), byte_level=False),
    "unigram, metaspace, lowercase NFKC": lambda: trained(
        models.Unigram(), trainers.UnigramTrainer(vocab_size=300, special_tokens=SPECIALS, unk_token="<unk>"),
        pre_tokenizers.Metaspace(split=True), normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])),
    "wordpiece, BERT normaliser and pre-tokenizer": lambda: trained(
        models.WordPiece(unk_token="<unk>"), trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIALS),
        pre_tokenizers.BertPreTokenizer(), normalizers.BertNormalizer(lowercase=True)),
}

REFUSED = {
    "llama 2's unsplit metaspace": lambda: bpe(pre_tokenizers.Metaspace(split=False), byte_level=False),
    "gemma's space replaced before a split on spaces": lambda: bpe(
        pre_tokenizers.Split(" ", behavior="merged_with_previous"), normalizers.Replace(" ", "▁"), byte_level=False),
    "byte level without its regex": lambda: bpe(pre_tokenizers.ByteLevel(use_regex=False)),
    "a prepend normalizer": lambda: bpe(pre_tokenizers.Metaspace(split=True), normalizers.Prepend("▁"),
                                        byte_level=False),
    "an unknown split regex": lambda: bpe(split(r"\w+|\s+")),
    "punctuation splitting alone": lambda: bpe(pre_tokenizers.Punctuation(), byte_level=False),
    "BPE dropout": lambda: bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), dropout=0.1),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_shapes_that_could_merge_across_a_word_boundary_are_refused(name):
    assert not prefix_stable(fast(REFUSED[name]()))


def test_a_post_processor_that_appends_or_an_added_token_that_strips_is_refused():
    tok = fast(ACCEPTED["gpt2 byte-level BPE"]())
    assert prefix_stable(tok)
    appending = ACCEPTED["gpt2 byte-level BPE"]()
    appending.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    assert not prefix_stable(PreTrainedTokenizerFast(tokenizer_object=appending, eos_token="</s>"))
    stripping = fast(ACCEPTED["gpt2 byte-level BPE"]())
    from tokenizers import AddedToken

    stripping.add_tokens([AddedToken("Answer", rstrip=True)])
    assert not prefix_stable(stripping)


PIECES = list("abcXYZ éàüñ東京\u0301 0123456789.,:;!?'\"-_\n\t") + ["<|im_end|>", " the", " Answer:", "  "] + \
    ["sky", "blue", "it", "7", " ", " ", " "]  # words and spaces often enough that most prompts are cut
text = st.one_of(st.lists(st.sampled_from(PIECES), min_size=1, max_size=25).map("".join),  # pieces run together
                 st.lists(st.sampled_from(PIECES), min_size=1, max_size=12).map(" ".join))  # or spaced out


@pytest.mark.parametrize("name", sorted(ACCEPTED))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(text, text, text), min_size=1, max_size=6))
def test_the_split_path_gives_the_plain_ids(name, rows):
    tok = _tokenizer(name)
    assert prefix_stable(tok), name
    records = [Record(p, c, r, "t") for p, c, r in rows]
    assert encode_records(records, tok, split_prompts=True) == [encode_record(r, tok) for r in records]


_CACHE = {}


def _tokenizer(name):
    if name not in _CACHE:
        _CACHE[name] = fast(ACCEPTED[name]())
    return _CACHE[name]
