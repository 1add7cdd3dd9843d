"""Data preparation at scale: batched tokenization equals the per-record rules, worker processes and the disk cache
equal one pass in this process, ids are held compactly, and the cache is keyed by what the ids depend on."""

import json
import os

import numpy as np
import pytest

from fastdpo.data import Fields, Record, load_records
from fastdpo.errors import UserError
from fastdpo.prepare import CHUNK, cache_key, load_pairs, Settings, tokenize_source
from fastdpo.tokenize import PairSet, TokenizedPair, encode_record, encode_records, tokenize_records

from conftest import example_rows, word_tokenizer, write_jsonl

USER = [{"role": "user", "content": "What colour is the sky ?"}]


def records() -> list[Record]:
    """Every kind the rules treat apart: text with and without specials in it, implicit prompts, chat, a chat
    template that renders the prompt differently alone (a boundary mismatch), identical responses."""
    rows = [Record("The sky is", " blue", " green", "t:1"), Record("<s> The sky is", " blue </s>", " no", "t:2"),
            Record("It is", " hot cold hot cold", " no", "t:3"), Record("a", " b", " b", "t:4"),
            Record(USER, [{"role": "assistant", "content": "blue"}], [{"role": "assistant", "content": "no"}], "t:5"),
            Record(USER + [{"role": "assistant", "content": "yes"}, {"role": "user", "content": "sky ?"}],
                   [{"role": "assistant", "content": "blue ."}], [{"role": "assistant", "content": "It is"}], "t:6")]
    return rows * 3


@pytest.mark.parametrize("add_bos", [True, False])
def test_batched_encoding_equals_the_per_record_rules(add_bos):
    tok = word_tokenizer(add_bos=add_bos)
    assert encode_records(records(), tok) == [encode_record(r, tok) for r in records()]
    mismatching = word_tokenizer(add_bos=add_bos)
    mismatching.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
                                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    encoded = encode_records(records(), mismatching)
    assert encoded == [encode_record(r, mismatching) for r in records()] and any(e[3] for e in encoded)


def test_a_pair_set_holds_four_bytes_a_token_and_gives_the_pairs_back():
    pairs = [TokenizedPair([0, 5, 6], [7, 1], [8, 9, 1], 3), TokenizedPair([0, 4], [11, 12, 13, 1], [1], 7)]
    held = PairSet.from_pairs(pairs)
    assert list(held) == pairs and held[1] == pairs[1] and held[0:1] == pairs[:1]
    assert held.ids.dtype == np.int32 and held.ids.nbytes == 4 * 15
    assert held.num_tokens().tolist() == [p.num_tokens for p in pairs]
    assert PairSet.concat([PairSet.from_pairs(pairs[:1]), PairSet.from_pairs(pairs[1:])]).digest() == held.digest()


def many_rows(n: int) -> list[dict]:
    base = example_rows(50)
    return [dict(base[i % 50], prompt=base[i % 50]["prompt"] + f" (case {i})") for i in range(n)]


def test_worker_processes_give_the_pairs_one_process_gives(tmp_path):
    """Chunks tokenized by forked workers: the same ids, order, record indices and counts."""
    from fastdpo.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny")
    rows = many_rows(2 * CHUNK + 300) + ['{"prompt": "a", "chosen": 5}']  # and one bad record, skipped
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    settings = Settings(128, 64, Fields(), "skip")
    parallel, stats, workers = tokenize_source(path, "train", tok, settings, "data", workers=2)
    plain, plain_stats, one = tokenize_source(path, "train", tok, settings, "data", workers=1)
    assert (workers, one) == (2, 1) and parallel.digest() == plain.digest()
    assert parallel.index.tolist() == plain.index.tolist() and stats.summary() == plain_stats.summary()
    assert stats.records == len(rows) and stats.skipped_bad == 1 and len(parallel) == len(rows) - 1
    single_pass, _ = tokenize_records(load_records(path, on_bad_record="skip").records, tok, 128, 64, "skip")
    assert single_pass.digest() == plain.digest()


def test_a_bad_record_in_a_worker_chunk_is_the_one_line_error(tmp_path):
    from fastdpo.models import load_tokenizer

    rows = many_rows(3 * CHUNK) + ['{"prompt": "a", "chosen": 5, "rejected": " b"}']
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=rf"d.jsonl:{len(rows)}: field 'chosen' must be text"):
        tokenize_source(path, "train", load_tokenizer("builtin:tiny"), Settings(128, 64, Fields(), "error"), "data",
                        workers=2)


def test_the_cache_is_reused_and_keyed_by_data_tokenizer_and_settings(tmp_path):
    from fastdpo.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny")
    path = write_jsonl(tmp_path / "d.jsonl", example_rows(30))
    cache, logs = tmp_path / "cache", []
    kw = dict(fields=Fields(), max_length=128, max_prompt_length=64, cache_dir=str(cache), log=logs.append)
    first, stats = load_pairs(path, "train", tok, **kw)
    again, again_stats = load_pairs(path, "train", tok, **kw)
    assert "tokenized" in logs[0] and "loaded from the cache" in logs[1]
    assert again.digest() == first.digest() and again_stats.summary() == stats.summary()
    assert isinstance(again.ids, np.memmap)  # read in place, not copied
    settings = Settings(128, 64, Fields(), "error")
    key = cache_key(path, "train", tok, settings)
    other_tok = word_tokenizer()
    assert len({key, cache_key(path, "train", other_tok, settings),
                cache_key(path, "train", tok, Settings(127, 64, Fields(), "error")),
                cache_key(write_jsonl(tmp_path / "e.jsonl", example_rows(31)), "train", tok, settings)}) == 4
    assert cache_key(write_jsonl(tmp_path / "copy.jsonl", example_rows(30)), "train", tok, settings) == key


def test_a_cache_that_cannot_be_written_costs_only_the_cache(tmp_path):
    from fastdpo.models import load_tokenizer

    cache = tmp_path / "cache"
    cache.write_text("a file where the cache directory should be")
    logs = []
    pairs, _ = load_pairs(write_jsonl(tmp_path / "d.jsonl", example_rows(10)), "train", load_tokenizer("builtin:tiny"),
                          fields=Fields(), max_length=128, max_prompt_length=64, cache_dir=str(cache / "data"),
                          log=logs.append)
    assert len(pairs) == 10 and "not cached" in logs[0]


def test_resume_and_later_runs_read_the_tokenized_data_from_the_cache(tmp_path, capsys):
    from fastdpo.config import build_config
    from fastdpo.training import train

    from conftest import make_model_dir

    model = make_model_dir(tmp_path / "m", seed=1)
    data = write_jsonl(tmp_path / "d.jsonl", example_rows(24))
    argv = ["--model", model, "--data", data, "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
            "--save_steps", "1", "--batch_size", "8", "--progress", "false", "--data_cache_dir", str(tmp_path / "c")]
    train(build_config(argv))
    assert "train data: 24 records tokenized, cached at" in capsys.readouterr().err
    train(build_config(argv + ["--max_steps", "3", "--resume"]))  # the later flag wins
    assert "train data: loaded from the cache" in capsys.readouterr().err


def test_preparation_precompute_and_evaluation_show_progress_on_a_terminal_only(tmp_path):
    """On a terminal (a pseudo-terminal here) each long phase has a bar; into a pipe or a log file nothing is
    drawn with carriage returns, and the phases' summary lines and a line per logging step say the same."""
    import os
    import pty
    import subprocess
    import sys
    import threading

    from conftest import make_model_dir

    model = make_model_dir(tmp_path / "m", seed=1)
    data = write_jsonl(tmp_path / "d.jsonl", example_rows(24))
    argv = [sys.executable, "-m", "fastdpo", "train", "--model", model, "--data", data, "--eval_data", data,
            "--reference", "precomputed", "--ref_cache_dir", "off", "--max_steps", "1", "--logging_steps", "1"]
    master, slave = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    chunks = []
    reader = threading.Thread(target=lambda: _drain(master, chunks))
    reader.start()
    proc = subprocess.run(argv + ["--output_dir", str(tmp_path / "tty"), "--data_cache_dir", "off"],
                          stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    reader.join(timeout=60)
    terminal = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, terminal[-2000:]
    for bar in ("tokenizing data", "tokenizing eval data", "reference log-probs", "evaluating"):
        assert bar in terminal, bar
    piped = subprocess.run(argv + ["--output_dir", str(tmp_path / "pipe"), "--data_cache_dir", "off"],
                           capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "\r" not in piped.stderr and "train data: 24 records tokenized" in piped.stderr
    assert "fastdpo: step 1/1 (epoch" in piped.stderr


def _drain(fd: int, chunks: list) -> None:
    import os

    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the other end closed
            return
        if not data:
            return
        chunks.append(data)
