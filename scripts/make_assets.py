#!/usr/bin/env python
"""Generate the shipped fastdpo package assets, deterministically and fully offline.

Writes (relative to the repository root):
  src/fastdpo/assets/example/train.jsonl   text preference pairs for the quickstart (~800 rows)
  src/fastdpo/assets/example/eval.jsonl    held-out pairs (128 rows; tasks/objects never seen in train)
  src/fastdpo/assets/tiny/tokenizer.json   byte-level BPE, vocab 1024, <s>=0 </s>=1 <pad>=2
  src/fastdpo/assets/tiny/tokenizer_config.json   PreTrainedTokenizerFast settings + chat template
  src/fastdpo/assets/tiny/config.json      LlamaConfig for the built-in tiny model (no weights shipped)

The preference is a style: chosen answers are helpful and polite, rejected answers are dismissive and rude.
Both mention the task and are built from several random variations per class with similar lengths, so the
signal is word choice (not a single fixed string, not length). Every output is byte-identical on rerun.

Usage:  python scripts/make_assets.py            # write + verify + summary
        python scripts/make_assets.py --no-check  # skip the bag-of-words learnability check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "fastdpo" / "assets"
EXAMPLE_DIR = ASSETS / "example"
TINY_DIR = ASSETS / "tiny"

SEED = 1234
N_TRAIN = 800
N_EVAL = 128
MAX_TOKENS = 58  # prompt + response, counting the BOS the tokenizer prepends (a trainer's EOS makes 59)
MAX_CHARS = 215  # prompt + response; a response pair over this is redrawn (keeps tokens under MAX_TOKENS)

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"]

# ---------------------------------------------------------------------------------------------------------------
# Text data
# ---------------------------------------------------------------------------------------------------------------

TRAIN_TASKS = [
    "water a plant", "boil an egg", "fix a flat tire", "clean a window", "paint a fence", "bake bread",
    "tie a tie", "fold a shirt", "wash a car", "make tea", "brew coffee", "sharpen a knife", "plant a tree",
    "feed a cat", "walk a dog", "cook rice", "change a light bulb", "hang a picture", "unclog a sink",
    "mop the floor", "make a bed", "pack a suitcase", "write a letter", "read a map", "start a campfire",
    "pitch a tent", "ride a bike", "learn to swim", "tune a guitar", "sew a button", "clean the oven",
    "wrap a gift", "make a salad", "grow tomatoes", "save money", "study for a test", "write an email",
    "set up a printer", "back up a laptop", "reset a password", "wash dishes", "do laundry", "bake cookies",
    "make pancakes", "clean a fish tank", "train a puppy", "fix a leaky faucet", "organize a closet",
]

# Held out: every object here is absent from the train tasks (verbs such as "clean" may be shared).
EVAL_TASKS = [
    "polish shoes", "knit a scarf", "peel a mango", "repair a zipper", "decorate a cake", "carve a pumpkin",
    "frame a poster", "groom a horse", "roast a chicken", "defrost a freezer", "stretch a canvas",
    "sweep a chimney", "bathe a hamster", "wax a snowboard", "oil a hinge", "patch a jacket",
]

PROMPT_TEMPLATES = [
    "Question: How do I {task}?\nAnswer:",
    "Question: What is the best way to {task}?\nAnswer:",
    "Question: Can you explain how to {task}?\nAnswer:",
    "Question: Any tips on how to {task}?\nAnswer:",
    "Question: I need help. How can I {task}?\nAnswer:",
    "Question: Which steps do I follow to {task}?\nAnswer:",
]

# Chosen (helpful, polite). An opener ending in "," continues in lower case; "!" starts a new sentence.
GOOD_OPENERS = ["Sure,", "Of course!", "Great question!", "Happy to help!", "Absolutely,", "Good question!",
                "Certainly,"]
GOOD_INTROS = ["here is a simple way to {task}:", "here is how to {task}:", "this is an easy way to {task}:",
               "here are the steps to {task}:"]
GOOD_STEP1 = ["gather everything you need", "read the instructions carefully", "set aside a little time",
              "clear a clean space to work", "watch a short video guide", "check what tools you have"]
GOOD_STEP2 = ["go slowly one step at a time", "check your progress as you go", "ask a friend if you get stuck",
              "take a short break when needed", "follow each step in order", "be patient with yourself"]
GOOD_STEP3 = ["enjoy the result", "tidy up after", "try again if needed", "celebrate your work"]
GOOD_CLOSERS = ["Hope that helps!", "Good luck, you can do it!", "Let me know if you have more questions.",
                "Happy to help anytime.", "I hope this is useful.", "Feel free to ask again.",
                "Have fun with it!"]

# Rejected (dismissive, rude).
BAD_OPENERS = ["No.", "Ugh.", "Seriously?", "Whatever.", "Nope.", "Not my problem.", "Go away."]
BAD_TASK = ["I am not going to tell you how to {task}.", "Why should I explain how to {task}?",
            "I refuse to help you {task}.", "Nobody cares how you {task}.", "Who even asks how to {task}?",
            "Learning to {task} is your job, not mine."]
BAD_POOL = ["Figure it out yourself.", "Stop wasting my time.", "Go look it up somewhere else.",
            "That is a dumb question.", "Leave me alone.", "Do not ask me again.", "I could not care less.",
            "Ask someone who cares.", "This is boring.", "You should already know this.",
            "Stop bothering me with this.", "I have better things to do."]


def make_chosen(rng: random.Random, task: str) -> str:
    opener = rng.choice(GOOD_OPENERS)
    intro = rng.choice(GOOD_INTROS).format(task=task)
    if not opener.endswith(","):
        intro = intro[0].upper() + intro[1:]
    body = f"first {rng.choice(GOOD_STEP1)}, then {rng.choice(GOOD_STEP2)}"
    if rng.random() < 0.35:
        body += f", and finally {rng.choice(GOOD_STEP3)}"
    return f" {opener} {intro} {body}. {rng.choice(GOOD_CLOSERS)}"


def make_rejected(rng: random.Random, task: str, target_chars: int) -> str:
    """Opener + a task sentence + rude sentences, stopping at the length closest to `target_chars`."""
    pool = BAD_POOL[:]
    rng.shuffle(pool)
    sentences = [rng.choice(BAD_OPENERS)]
    task_sentence = rng.choice(BAD_TASK).format(task=task)
    tail = pool[:]
    tail.insert(rng.randrange(2), task_sentence)  # the task is mentioned first or second after the opener
    best, best_gap = None, None
    for sentence in tail:
        sentences.append(sentence)
        if task_sentence not in sentences:
            continue
        text = " " + " ".join(sentences)
        gap = abs(len(text) - target_chars)
        if best_gap is None or gap < best_gap:
            best, best_gap = text, gap
        if len(text) > target_chars:
            break
    return best


def make_rows(rng: random.Random, tasks: list[str], n: int) -> list[dict]:
    rows = []
    # Cycle through the tasks in shuffled rounds so every task is used about equally often.
    order: list[str] = []
    while len(rows) < n:
        if not order:
            order = tasks[:]
            rng.shuffle(order)
        task = order.pop()
        prompt = rng.choice(PROMPT_TEMPLATES).format(task=task)
        while True:
            chosen = make_chosen(rng, task)
            # Rejected length varies around the chosen length (sometimes longer, sometimes shorter).
            rejected = make_rejected(rng, task, round(len(chosen) * rng.uniform(0.85, 1.15)))
            if len(prompt) + max(len(chosen), len(rejected)) <= MAX_CHARS:
                break
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def check_row_format(row: dict) -> None:
    p, c, r = row["prompt"], row["chosen"], row["rejected"]
    assert p and p == p.rstrip() and p == p.lstrip(), repr(p)
    for resp in (c, r):
        assert resp.startswith(" ") and not resp.startswith("  "), repr(resp)
        assert resp == resp.rstrip(), repr(resp)
    assert c != r


# Generic English so that words never seen in the examples still split into sensible pieces.
GENERIC_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore every summer morning.",
    "Please remember to lock the door before you leave the house.",
    "The weather today is sunny with a light breeze from the west.",
    "He opened the window because the room was getting too warm.",
    "Our team finished the project two days ahead of the deadline.",
    "Reading books is a wonderful way to learn about the world.",
    "The children played in the park until the sun went down.",
    "Could you tell me where the nearest train station is?",
    "I would like a cup of hot chocolate with extra cream, please.",
    "The museum opens at nine and closes at five on weekdays.",
    "Scientists study the stars to understand how galaxies form.",
    "My grandmother makes the best apple pie in the whole town.",
    "Drink plenty of water and get enough sleep to stay healthy.",
    "The computer restarted after installing the latest update.",
    "They traveled by boat across the lake to visit their friends.",
    "Music can change the mood of a room in just a few seconds.",
    "The teacher explained the lesson again for anyone who missed it.",
    "A small garden can produce a surprising amount of vegetables.",
    "We should leave early tomorrow to avoid the heavy traffic.",
    "The library has thousands of books, maps, and old newspapers.",
    "Thank you very much for your kind and thoughtful message.",
    "The price of fresh fruit usually drops during the harvest season.",
    "Write your name at the top of the page before you begin.",
    "Birds build their nests high in the branches of tall trees.",
    "The doctor said the results would be ready by next Monday.",
    "Learning a new language takes practice, patience, and curiosity.",
    "The river flows quietly through the valley toward the ocean.",
    "I forgot my umbrella, so I got wet walking home from work.",
    "Numbers like 1, 2, 3, 10, 42, 100, and 2024 appear everywhere.",
    "Why do cats sleep so much during the day? Nobody really knows.",
    "The engineer checked every bolt on the bridge twice.",
    "Good friends listen carefully and speak honestly to each other.",
    "The recipe needs flour, sugar, butter, eggs, and a pinch of salt.",
    "After the storm, the streets were covered with leaves and branches.",
    "It's important to ask questions when you don't understand something.",
    "The store will be closed on Sunday for the national holiday.",
    "Mountains, forests, deserts, and islands each have unique animals.",
    "Happy birthday! I hope your day is full of joy and laughter.",
    "The airplane landed safely despite the strong wind and rain.",
    "Software developers write code, test it, and fix the bugs they find.",
    "History teaches us about the people and events that shaped our lives.",
]

# ---------------------------------------------------------------------------------------------------------------
# Tokenizer / config
# ---------------------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'system' %}"
    "{{ '<|user|>\nSystem: ' + message['content'] + '<|end|>\n' }}"
    "{% else %}"
    "{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos)],
    )
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 2048,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_config(vocab_size: int) -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        rms_norm_eps=1e-5,
        attention_dropout=0.0,
        initializer_range=0.02,
    )
    cfg.to_json_file(str(TINY_DIR / "config.json"))  # non-default fields + every field set above


# ---------------------------------------------------------------------------------------------------------------
# Verification and summary
# ---------------------------------------------------------------------------------------------------------------

def verify(train: list[dict], eval_rows: list[dict]):
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(TINY_DIR))
    cfg = AutoConfig.from_pretrained(str(TINY_DIR))

    # Special tokens and BOS handling.
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert tok("hi")["input_ids"][0] == 0
    assert 0 not in tok("hi", add_special_tokens=False)["input_ids"]
    assert 1 not in tok("hi")["input_ids"]  # no EOS appended by the tokenizer; the trainer adds it
    assert tok.decode(tok("<|user|>\nhi<|end|>\n")["input_ids"], skip_special_tokens=True) == "\nhi\n"
    assert tok.padding_side == "right" and tok.model_max_length == 2048
    text = "Sure, here is how to water a plant."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text

    # Config matches the tokenizer.
    assert cfg.model_type == "llama" and cfg.vocab_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 2)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 176, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (4, 2, 2048)
    assert cfg.tie_word_embeddings is False

    # Chat template: the generation-prompt rendering is an exact token prefix of the full conversation.
    convs = [
        [{"role": "user", "content": "How do I water a plant?"}],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}],
        [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why not?"},
         {"role": "user", "content": " Go on, one more"}],
    ]
    replies = [" Sure, here is how.", "Hello! How can I help?", "\nA short one: knock knock."]
    for prompt_msgs, reply in zip(convs, replies):
        p_text = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        f_text = tok.apply_chat_template(prompt_msgs + [{"role": "assistant", "content": reply}], tokenize=False)
        assert f_text.startswith(p_text) and p_text.startswith("<s><|user|>\n") and p_text.endswith("<|assistant|>\n")
        p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
        f_ids = tok(f_text, add_special_tokens=False)["input_ids"]
        assert p_ids[0] == 0 and p_ids.count(0) == 1, p_ids
        assert f_ids[: len(p_ids)] == p_ids, (p_text, f_text)
        assert f_ids[-2:] == tok.convert_tokens_to_ids(["<|end|>"]) + tok("\n", add_special_tokens=False)["input_ids"]

    # Every text row: prompt ids are an exact prefix of prompt+response ids, and the pair fits the budget.
    lengths = {"prompt": [], "chosen": [], "rejected": [], "total": []}
    for row in train + eval_rows:
        check_row_format(row)
        p_ids = tok(row["prompt"])["input_ids"]
        lengths["prompt"].append(len(p_ids))
        for key in ("chosen", "rejected"):
            j_ids = tok(row["prompt"] + row[key])["input_ids"]
            assert j_ids[: len(p_ids)] == p_ids, (row["prompt"], row[key])
            lengths[key].append(len(j_ids) - len(p_ids))
            lengths["total"].append(len(j_ids))
            assert len(j_ids) <= MAX_TOKENS, (len(j_ids), row)
        c_ids = tok(row["prompt"] + row["chosen"])["input_ids"][len(p_ids):]
        r_ids = tok(row["prompt"] + row["rejected"])["input_ids"][len(p_ids):]
        assert c_ids != r_ids

    # The tiny model builds and runs from the config (random init, nothing downloaded).
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    batch = tok([r["prompt"] + r["chosen"] for r in eval_rows[:4]], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[-1] == len(tok)
    n_params = sum(p.numel() for p in model.parameters())
    return tok, lengths, n_params


def bow_check(tok, train: list[dict], eval_rows: list[dict]) -> dict:
    """Bag-of-token logistic regression on train responses; pairwise accuracy on held-out eval pairs."""
    import numpy as np

    V = len(tok)

    def feats(texts):
        X = np.zeros((len(texts), V), dtype=np.float64)
        for i, t in enumerate(texts):
            for j in tok(t, add_special_tokens=False)["input_ids"]:
                X[i, j] += 1.0
        return X

    Xc, Xr = feats([r["chosen"] for r in train]), feats([r["rejected"] for r in train])
    X = np.vstack([Xc, Xr])
    y = np.concatenate([np.ones(len(train)), np.zeros(len(train))])
    w, b = np.zeros(V), 0.0
    for _ in range(300):  # plain full-batch gradient descent with a little L2
        z = np.clip(X @ w + b, -30, 30)
        p = 1.0 / (1.0 + np.exp(-z))
        g = p - y
        w -= 0.05 * (X.T @ g / len(y) + 1e-3 * w)
        b -= 0.05 * g.mean()
    Ec, Er = feats([r["chosen"] for r in eval_rows]), feats([r["rejected"] for r in eval_rows])
    pair_acc = float(np.mean(Ec @ w > Er @ w))
    train_acc = float(np.mean(Xc @ w > Xr @ w))
    # Baselines that should NOT explain the preference.
    len_c, len_r = Ec.sum(1), Er.sum(1)
    longer_chosen = float(np.mean(len_c > len_r))
    # Vocabulary overlap: eval topic words not seen in any train row.
    train_words = {w_ for r in train for k in r for w_ in r[k].replace("?", " ").split()}
    eval_topic_words = {w_ for t in EVAL_TASKS for w_ in t.split()}
    unseen = sorted(eval_topic_words - train_words)
    return {"train_pair_acc": train_acc, "eval_pair_acc": pair_acc, "eval_chosen_longer": longer_chosen,
            "unseen_eval_topic_words": unseen}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-check", action="store_true", help="skip the bag-of-words learnability check")
    args = ap.parse_args()

    assert not set(TRAIN_TASKS) & set(EVAL_TASKS)
    train_objects = {w for t in TRAIN_TASKS for w in t.split()}
    for t in EVAL_TASKS:
        assert t.split()[-1] not in train_objects, t

    rng = random.Random(SEED)
    train = make_rows(random.Random(rng.randrange(2**32)), TRAIN_TASKS, N_TRAIN)
    eval_rows = make_rows(random.Random(rng.randrange(2**32)), EVAL_TASKS, N_EVAL)
    for row in train + eval_rows:
        check_row_format(row)
    train_prompts = {r["prompt"] for r in train}
    assert not any(r["prompt"] in train_prompts for r in eval_rows)

    EXAMPLE_DIR.mkdir(parents=True, exist_ok=True)
    TINY_DIR.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", eval_rows)):
        with open(EXAMPLE_DIR / name, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}, ensure_ascii=False) + "\n")

    corpus = [r["prompt"] + r[k] for r in train + eval_rows for k in ("chosen", "rejected")] + GENERIC_SENTENCES
    tok = build_tokenizer(corpus)
    tok.save(str(TINY_DIR / "tokenizer.json"), pretty=True)
    with open(TINY_DIR / "tokenizer_config.json", "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    write_config(tok.get_vocab_size(with_added_tokens=True))

    hf_tok, lengths, n_params = verify(train, eval_rows)

    # ------------------------------------------------------------------ summary
    def stat(xs):
        return f"mean {sum(xs) / len(xs):.1f} / max {max(xs)}"

    files = sorted(p for p in ASSETS.rglob("*") if p.is_file())
    print("files:")
    for p in files:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
        print(f"  {p.relative_to(ROOT)}  {p.stat().st_size:>7} B  sha256:{digest}")
    print(f"assets total: {sum(p.stat().st_size for p in files)} B")
    print(f"rows: train {len(train)}, eval {len(eval_rows)}; tasks: train {len(TRAIN_TASKS)}, "
          f"eval {len(EVAL_TASKS)} (held out)")
    print(f"vocab: {len(hf_tok)} (incl. {len(SPECIAL_TOKENS)} specials); tiny model params: {n_params}")
    print(f"tokens (train+eval, prompt incl. BOS): prompt {stat(lengths['prompt'])}; "
          f"chosen {stat(lengths['chosen'])}; rejected {stat(lengths['rejected'])}; "
          f"prompt+response {stat(lengths['total'])}")
    print("example rows:")
    for row in (train[0], eval_rows[0]):
        print("  " + json.dumps(row, ensure_ascii=False))
    print("  tokens:", hf_tok.convert_ids_to_tokens(hf_tok(eval_rows[0]["prompt"] + eval_rows[0]["chosen"])["input_ids"]))
    if not args.no_check:
        res = bow_check(hf_tok, train, eval_rows)
        print(f"bag-of-tokens logistic regression: train pair acc {res['train_pair_acc']:.3f}, "
              f"held-out eval pair acc {res['eval_pair_acc']:.3f}; "
              f"length baseline (chosen longer) on eval {res['eval_chosen_longer']:.3f}")
        print(f"eval topic words never seen in train rows: {' '.join(res['unseen_eval_topic_words'])}")
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
