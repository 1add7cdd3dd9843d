"""Data preparation at scale: a source's records -> a `PairSet`.

Records stream from the source in chunks; worker processes tokenize the chunks with batched tokenizer calls (on
Linux, forked, when the source is larger than two chunks); the pairs land in compact int32 arrays. The result is
cached on disk, keyed by the data's content, the tokenizer and the settings, and read back (memory-mapped) by
later runs, by `--resume` and by the other data-parallel processes: the main process tokenizes and writes, the
others read.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from fastdpo.data import Fields, Record, describe, iter_records
from fastdpo.errors import UserError
from fastdpo.runtime import Processes
from fastdpo.tokenize import PairSet, TokenizeStats, _plain_fast, encode_records, prefix_stable, tokenize_records

CHUNK = 2048  # records per tokenization task
RULES = 2  # the tokenization rules' version: a cached set made under other rules is not reused


@dataclass(frozen=True)
class Settings:
    """Everything besides the data and the tokenizer that the tokenized pairs depend on."""

    max_length: int
    max_prompt_length: int
    fields: Fields
    on_bad_record: str


def load_pairs(source, split: str, tokenizer, *, fields: Fields, max_length: int, max_prompt_length: int,
               on_bad_record: str = "error", name: str = "data", cache_dir: str | None = None,
               processes: Processes = Processes(), progress: bool = False, log=None) -> tuple[PairSet, TokenizeStats]:
    """Read, validate and tokenize a preference data source (a path or name, or an object in memory passed as the
    option `name`); a source with no usable pair is an error. `cache_dir`: where tokenized sets are cached (None:
    no cache). Every process of a data-parallel run calls this; with a cache the main process does the work."""
    settings = Settings(max_length, max_prompt_length, fields, on_bad_record)
    log = log or (lambda text: None)
    path = None
    if cache_dir:
        key = cache_key(source, split, tokenizer, settings, name)
        path = os.path.join(cache_dir, key) if key else None
    start = time.perf_counter()
    if processes.main or path is None:
        try:
            pairs, stats, how = _load_or_tokenize(source, split, tokenizer, settings, name, path, progress, log)
        except UserError as e:
            if path is not None:
                processes.gather(str(e))  # the others stop with the same line instead of waiting
            raise
        if path is not None:
            processes.gather(None)
    else:
        failed = next((m for m in processes.gather(None) if m), None)
        if failed:
            raise UserError(failed)
        cached = read_cache(path)
        pairs, stats, how = cached + ("",) if cached else _load_or_tokenize(source, split, tokenizer, settings, name,
                                                                              None, False)
    if stats.records == stats.skipped_bad:
        detail = f"; {stats.skipped_bad} bad records were skipped" if stats.skipped_bad else ""
        raise UserError(f"{describe(source, name)}: no preference records found{detail}")
    if len(pairs) == 0:
        label = "eval data" if name == "eval_data" else "data"
        raise UserError(f"{describe(source, name)}: no usable preference pair left ({stats.summary(label)})"
                        + no_room_hint(stats, settings))
    if how:
        log(f"{'eval' if name == 'eval_data' else 'train'} data: {how} ({time.perf_counter() - start:.1f} s)")
    return pairs, stats


def no_room_hint(stats: TokenizeStats, settings: Settings) -> str:
    """What to change when pairs were dropped for want of room."""
    if not stats.dropped_no_room:
        return ""
    return (f"; {stats.dropped_no_room} prompts left no room for a response within --max_length "
            f"{settings.max_length} (prompts are cut to --max_prompt_length {settings.max_prompt_length}; the longest "
            f"has {stats.longest_prompt} tokens): raise --max_length or lower --max_prompt_length")


def _load_or_tokenize(source, split, tokenizer, settings: Settings, name: str, path: str | None, progress: bool,
                      notice=None):
    """(pairs, stats, how they were obtained): from the cache at `path`, or tokenized (and cached there)."""
    cached = read_cache(path) if path else None
    if cached:
        return (*cached, f"loaded from the cache {path}")
    pairs, stats, workers = tokenize_source(source, split, tokenizer, settings, name, progress, notice)
    how = f"{stats.records} records tokenized" + (f" by {workers} processes" if workers > 1 else "")
    if path and len(pairs):
        try:
            write_cache(path, pairs, stats)
            how += f", cached at {path}"
        except OSError as e:  # the cache is an optimisation: a full or read-only disk costs only the next run
            how += f", not cached ({e.strerror or e} at {os.path.dirname(path)})"
    return pairs, stats, how


def tokenize_source(source, split: str, tokenizer, settings: Settings, name: str, progress: bool = False,
                    notice=None, workers: int | None = None) -> tuple[PairSet, TokenizeStats, int]:
    """Every record of the source, tokenized in chunks: (pairs, stats, number of worker processes used).

    A fast tokenizer encodes text records on all cores by itself; chat records (their templates render in
    Python) and other tokenizers go to forked worker processes once there are more than two chunks (`workers`:
    how many, instead of that choice). The split
    prompt path (`tokenize.prefix_stable`) is first checked against the plain path on the first records."""
    from tqdm.auto import tqdm

    stats = TokenizeStats()
    chunks = _chunks(iter_records(source, split, settings.fields, name), settings.on_bad_record, stats)
    todo = [c for c in (next(chunks, None), next(chunks, None), next(chunks, None)) if c]
    split_prompts = prefix_stable(tokenizer) and bool(todo) and _splits_agree(todo[0][:32], tokenizer)
    if prefix_stable(tokenizer) and todo and not split_prompts and notice:
        notice("fastdpo: this tokenizer's prompts do not split exactly at word boundaries; tokenizing them whole")
    if workers is None:
        workers = _workers(tokenizer, todo[0]) if len(todo) > 2 else 1
    parts = []
    label = "eval data" if name == "eval_data" else "data"
    with tqdm(desc=f"tokenizing {label}", unit=" records", disable=not progress, file=sys.stderr) as bar, \
            _map(workers, tokenizer, settings, split_prompts) as run:
        for part, part_stats in run(_chain(todo, chunks)):
            parts.append(part)
            stats.merge(part_stats)
            bar.update(part_stats.records)
    pairs = PairSet.concat(parts)
    del parts
    _return_freed_memory()
    return pairs, stats, workers


def _return_freed_memory() -> None:
    """Give the heap that tokenization freed (the token lists, the chunks' arrays) back to the system: glibc keeps
    it otherwise, and the training run after it would carry some 3 bytes a token more (measured at 50k pairs)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _splits_agree(records: list[Record], tokenizer) -> bool:
    return encode_records(records, tokenizer, split_prompts=True) == encode_records(records, tokenizer,
                                                                                   split_prompts=False)


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def _chunks(items, on_bad_record: str, stats: TokenizeStats) -> Iterator[list[Record]]:
    """The usable records in lists of CHUNK; bad ones raise their one-line error, or are counted in `stats`."""
    chunk = []
    for item in items:
        if isinstance(item, Record):
            chunk.append(item)
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
            continue
        where, e = item
        if on_bad_record == "error":
            raise e.error(where)
        stats.records += 1
        stats.skip(where, str(e))
    if chunk:
        yield chunk


def _workers(tokenizer, sample: list[Record]) -> int:
    """Worker processes for a large source: one (this process) where a fast tokenizer's own threads do the work,
    else a forked worker per core (Linux only: fork needs no re-import)."""
    rust_threads = os.environ.get("TOKENIZERS_PARALLELISM", "true").lower() not in ("false", "0", "off", "no")
    if rust_threads and _plain_fast(tokenizer) and all(isinstance(r.prompt, str) for r in sample):
        return 1
    if not sys.platform.startswith("linux"):
        return 1
    return max(1, len(os.sched_getaffinity(0)))


_JOB: tuple | None = None  # (tokenizer, settings, split prompts) of the worker processes, inherited through fork


def _tokenize_chunk(records: list[Record]) -> tuple[PairSet, TokenizeStats]:
    tokenizer, settings, split_prompts = _JOB
    return tokenize_records(records, tokenizer, settings.max_length, settings.max_prompt_length,
                            settings.on_bad_record, split_prompts)


@contextlib.contextmanager
def _map(workers: int, tokenizer, settings: Settings, split_prompts: bool):
    """A function mapping chunks to their tokenized parts, in order: in this process, or in forked workers."""
    global _JOB
    _JOB = (tokenizer, settings, split_prompts)
    try:
        if workers == 1:
            yield lambda chunks: map(_tokenize_chunk, chunks)
            return
        # the workers tokenize one text at a time in Rust; the variable also keeps tokenizers from warning that
        # it disabled its thread pool after the fork
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            pool = multiprocessing.get_context("fork").Pool(workers)
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
        with pool:
            yield lambda chunks: pool.imap(_tokenize_chunk, chunks)
    finally:
        _JOB = None


# --- the cache --------------------------------------------------------------------------------------------------


def data_cache_dir(cfg) -> str | None:
    """Where the config caches tokenized data (`--data_cache_dir`; None: off)."""
    if cfg.data_cache_dir == "off":
        return None
    if cfg.data_cache_dir:
        return os.path.expanduser(cfg.data_cache_dir)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fastdpo", "data")


def cache_key(source, split: str, tokenizer, settings: Settings, name: str = "data") -> str | None:
    """A name for the tokenized set of `source` under `tokenizer` and `settings`; None when the source cannot be
    fingerprinted (it is then not cached)."""
    data = source_fingerprint(source, split, name)
    if data is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    for part in (f"fastdpo data, rules {RULES}", split, json.dumps(asdict(settings), sort_keys=True), data,
                 tokenizer_fingerprint(tokenizer)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def source_fingerprint(source, split: str, name: str = "data") -> str | None:
    """The data's content: a file's bytes, a data set's fingerprint, a list's JSON."""
    from fastdpo.data import datasets_module, resolve_data

    if isinstance(source, str):
        path = resolve_data(source, name)
        if os.path.isfile(path):
            h = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 23), b""):
                    h.update(block)
            return f"file {h.hexdigest()}"
        if os.path.isdir(path):
            datasets = datasets_module()
            try:
                ds = datasets.load_from_disk(path)
            except FileNotFoundError:
                return None  # not a data set: reading it says so
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) and split in ds else ds
            return f"dataset {getattr(ds, '_fingerprint', None)}" if hasattr(ds, "_fingerprint") else None
        return None  # a hub data set: tokenized each run
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(source, datasets.DatasetDict):
        source = source[split] if split in source else None
    if datasets is not None and isinstance(source, datasets.Dataset):
        return f"dataset {source._fingerprint}"
    if isinstance(source, (list, tuple)):
        try:
            return "list " + hashlib.blake2b(json.dumps(source, sort_keys=True).encode(), digest_size=16).hexdigest()
        except (TypeError, ValueError):
            return None
    return None


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything the token ids depend on: the tokenizer's own definition, its special tokens, its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                sorted(tokenizer.get_added_vocab().items())]
    parts = [type(tokenizer).__name__, body, json.dumps(specials), str(getattr(tokenizer, "chat_template", None))]
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=16).hexdigest()


def write_cache(path: str, pairs: PairSet, stats: TokenizeStats) -> None:
    """The set at `path` (a directory), written whole through a temporary directory and a rename."""
    root = os.path.dirname(path)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-" + os.path.basename(path) + "-")
    try:
        for name, array in (("ids", pairs.ids), ("bounds", pairs.bounds), ("index", pairs.index)):
            np.save(os.path.join(tmp, name + ".npy"), np.ascontiguousarray(array))
        meta = {**asdict(stats), "skip_reasons": dict(stats.skip_reasons)}
        with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        if os.path.isdir(path):  # written meanwhile by another run with the same key: the same content
            shutil.rmtree(tmp)
            return
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_cache(path: str) -> tuple[PairSet, TokenizeStats] | None:
    """The cached set at `path`, its token ids memory-mapped; None when there is none (or it is unreadable)."""
    try:
        ids = np.load(os.path.join(path, "ids.npy"), mmap_mode="r")
        bounds, index = np.load(os.path.join(path, "bounds.npy")), np.load(os.path.join(path, "index.npy"))
        with open(os.path.join(path, "stats.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    stats = TokenizeStats(**{**meta, "skip_reasons": Counter(meta.get("skip_reasons", {}))})
    return PairSet(ids, bounds, index), stats
