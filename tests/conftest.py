"""Shared fixtures: tiny tokenizers with known ids and tiny random Llama models, all built offline."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fastdpo's default caches (tokenized data, reference log-probs) live under $XDG_CACHE_HOME: the tests' go to a
# directory of their own, not the user's home, and start empty
# (the C++ ops DeepSpeed compiles on first use, which torch keeps under the same cache, stay in the user's: compiled
# once, not in every session)
_user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(_user_cache, "torch_extensions", "fastdpo-tests"))
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="fastdpo-test-cache-")

WORDS = ["The", "sky", "is", "blue", "black", "green", "grass", "sun", "hot", "cold", "yes", "no", "a", "b", "c",
         "d", "e", "f", "g", "h", "hello", "world", "What", "colour", "?", ".", "It"]
SPECIALS = ["<s>", "</s>", "<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {% else %}<|assistant|> {% endif %}"
    "{{ m['content'] }} <|end|> {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def word_tokenizer(add_bos: bool = True, chat: bool = True):
    """A word-level tokenizer with fixed ids: <s>=0 </s>=1 <pad>=2 <unk>=3, then the specials, then WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def ids(*words: str) -> list[int]:
    table = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    return [table[w] for w in words]


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tok():
    return word_tokenizer(add_bos=True)


@pytest.fixture
def tok_nobos():
    return word_tokenizer(add_bos=False)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def run_cli(argv, capsys, expect_code: int = 0) -> str:
    """Run `fastdpo ARGV` in-process; return stdout. Asserts the exit code."""
    from fastdpo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    assert exit_info.value.code == expect_code, (exit_info.value.code, out, err)
    run_cli.last_stderr = err
    return out


def make_model_dir(path, seed: int = 0, hidden: int = 32):
    """A tiny random Llama with the built-in tokenizer, saved in Hugging Face format."""
    from fastdpo.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny")
    tiny_llama(len(tok), seed=seed, hidden=hidden).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def example_rows(n: int, split: str = "train") -> list[dict]:
    from fastdpo.models import asset_path

    with open(asset_path(f"example/{split}.jsonl")) as f:
        return [json.loads(line) for line in f][:n]


def load_state(path) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_weights(a, b, atol: float = 0.0) -> None:
    """The saved models in directories a and b have the same tensors, each equal to `atol`."""
    import torch

    sa, sb = load_state(a), load_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)


def model_and_pairs(tmp_path_factory, name: str, seed: int, rows: int) -> tuple:
    """(root, model dir, pairs.jsonl): a tiny random model and the first `rows` example pairs, for training tests."""
    root = tmp_path_factory.mktemp(name)
    return root, make_model_dir(root / "model", seed=seed), write_jsonl(root / "pairs.jsonl", example_rows(rows))


@pytest.fixture(scope="module")
def word_models(tmp_path_factory):
    """Two tiny random Llamas (seeds 1 and 2) saved with the word tokenizer: a policy and its reference."""
    root = tmp_path_factory.mktemp("models")
    tok = word_tokenizer()
    for name, seed in (("policy", 1), ("reference", 2)):
        tiny_llama(len(tok), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root
