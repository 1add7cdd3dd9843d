"""Records -> token ids: prompt / chosen / rejected, with the BOS/EOS rules and truncation, every change counted.

Rules (the bugs users of other trainers meet most are here, so each is explicit and tested):
- The prompt carries the tokenizer's own special tokens, with a BOS at most once (chat templates often write the
  BOS into the text as well).
- A response is tokenized as the continuation of its prompt (the joint tokenization, split after the prompt's
  ids). When the prompt's ids are not a prefix of the joint ids (a token merged across the boundary, or a chat
  template that renders the prompt differently alone), the prompt's ids are kept whole and the response is
  tokenized on its own: the boundary is never corrupted, and the count is reported.
- Text responses end with the EOS token (appended unless already there). A chat-templated response already ends
  its turn with the template's own end-of-turn text; the EOS is appended only if the response holds none.
- Truncation: the prompt keeps its end (and its BOS) to fit `max_prompt_length`; responses keep their start to
  fit `max_length` together with the prompt; a pair whose prompt leaves no room for a response is dropped.

`encode_record` applies the rules to one record; `encode_records` gives the same ids for many at once with
batched tokenizer calls (tested equal). The pairs are held in a `PairSet`: every token id in one int32 array and
four boundaries per pair, about 4 bytes a token, where lists of Python ints take about 36.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from fastdpo.data import BadRecord, Record
from fastdpo.errors import UserError


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int  # position of the record in the loaded data, kept through drops for per-pair outputs

    @property
    def num_tokens(self) -> int:
        """Tokens of the pair's two sequences, prompt + chosen and prompt + rejected (the usual tokens/s count)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def longest_sequence(self) -> int:
        """Tokens of the longer of the pair's two sequences, prompt + its longer response."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def shared_length(self) -> int:
        """Tokens of the pair's prefix-shared segment, prompt + chosen + rejected."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


class PairSet:
    """Tokenized pairs, compactly: `ids` holds every token (int32), `bounds[i]` pair i's prompt, chosen and rejected
    starts and its end in `ids` (int64, shape (N, 4)), `index[i]` its record's position in the source. Indexing
    gives a `TokenizedPair` (a slice, a list of them); the arrays may be memory-mapped from the data cache."""

    def __init__(self, ids: np.ndarray, bounds: np.ndarray, index: np.ndarray):
        assert bounds.ndim == 2 and bounds.shape[1] == 4 and len(index) == len(bounds)
        self.ids, self.bounds, self.index = ids, bounds, index

    @classmethod
    def from_pairs(cls, pairs: Sequence[TokenizedPair]) -> "PairSet":
        parts = [np.asarray(ids, dtype=np.int32) for p in pairs for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids)]
        lengths = np.array([len(x) for x in parts], dtype=np.int64).reshape(-1, 3)
        return cls._from_parts(parts, lengths, np.array([p.index for p in pairs], dtype=np.int64))

    @classmethod
    def _from_parts(cls, parts: list[np.ndarray], lengths: np.ndarray, index: np.ndarray) -> "PairSet":
        """From each pair's three id arrays, in order, and their lengths (N, 3)."""
        ends = np.cumsum(lengths.reshape(-1))  # the end of every part
        starts = np.concatenate([[0], ends[:-1]]).reshape(-1, 3) if len(ends) else np.zeros((0, 3), np.int64)
        bounds = np.concatenate([starts, ends.reshape(-1, 3)[:, 2:]], axis=1) if len(ends) else np.zeros((0, 4),
                                                                                                        np.int64)
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return cls(ids.astype(np.int32, copy=False), bounds.astype(np.int64), index)

    @classmethod
    def concat(cls, sets: list["PairSet"]) -> "PairSet":
        """One set of all of them, in order; each set's arrays are released as they are copied."""
        total, count = sum(len(s.ids) for s in sets), sum(len(s) for s in sets)
        ids, bounds, index = np.empty(total, np.int32), np.empty((count, 4), np.int64), np.empty(count, np.int64)
        at = row = 0
        while sets:
            s = sets.pop(0)
            ids[at : at + len(s.ids)] = s.ids
            bounds[row : row + len(s)] = s.bounds - (s.bounds[0, 0] if len(s) else 0) + at
            index[row : row + len(s)] = s.index
            at, row = at + len(s.ids), row + len(s)
        return cls(ids, bounds, index)

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        a, b, c, d = (int(x) for x in self.bounds[i])
        return TokenizedPair(self.ids[a:b].tolist(), self.ids[b:c].tolist(), self.ids[c:d].tolist(),
                             int(self.index[i]))

    def __iter__(self) -> Iterator[TokenizedPair]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> np.ndarray:
        """Tokens of each pair's prompt, chosen and rejected. Shape: (N, 3)."""
        return np.diff(self.bounds, axis=1)

    def num_tokens(self) -> np.ndarray:
        """`TokenizedPair.num_tokens` of every pair. Shape: (N,)."""
        n = self.lengths()
        return 2 * n[:, 0] + n[:, 1] + n[:, 2]

    def digest(self) -> str:
        """A hash of every pair's token ids and boundaries (what the numbers computed from them depend on)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(np.ascontiguousarray(self.ids).data)
        h.update(np.ascontiguousarray(self.bounds - (self.bounds[0, 0] if len(self) else 0)).data)
        return h.hexdigest()


@dataclass
class TokenizeStats:
    records: int = 0
    pairs: int = 0
    truncated_prompts: int = 0
    truncated_chosen: int = 0
    truncated_rejected: int = 0
    dropped_no_room: int = 0  # the prompt leaves no room for a response within max_length
    dropped_identical: int = 0  # chosen and rejected are the same tokens: no preference to learn
    dropped_empty: int = 0  # no prompt token to condition the first response token on
    boundary_mismatches: int = 0  # prompt ids not a prefix of prompt+response ids; tokenized apart instead
    repeated_prompts: int = 0  # records whose responses repeated their prompt (removed from them)
    skipped_bad: int = 0  # bad records skipped (--on_bad_record skip)
    skip_reasons: Counter = field(default_factory=Counter)  # what was wrong -> how many
    skip_examples: dict = field(default_factory=dict)  # what was wrong -> the first place it was seen
    longest_prompt: int = 0  # tokens of the longest prompt before truncation

    def skip(self, where: str, why: str) -> None:
        reason = why.split(" (")[0]  # the kind of problem, without its details
        self.skipped_bad += 1
        self.skip_reasons[reason] += 1
        self.skip_examples.setdefault(reason, where)

    def merge(self, other: "TokenizeStats") -> None:
        for name in ("records", "pairs", "truncated_prompts", "truncated_chosen", "truncated_rejected",
                     "dropped_no_room", "dropped_identical", "dropped_empty", "boundary_mismatches",
                     "repeated_prompts", "skipped_bad"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skip_reasons.update(other.skip_reasons)
        for reason, where in other.skip_examples.items():
            self.skip_examples.setdefault(reason, where)
        self.longest_prompt = max(self.longest_prompt, other.longest_prompt)

    def summary(self, name: str = "data") -> str:
        parts = [f"{name}: {self.records} records -> {self.pairs} pairs"]
        trunc = [(self.truncated_prompts, "prompts"), (self.truncated_chosen, "chosen"),
                 (self.truncated_rejected, "rejected")]
        parts.append("truncated " + ", ".join(f"{n} {what}" for n, what in trunc))
        dropped = [(self.dropped_identical, "chosen == rejected"), (self.dropped_empty, "empty prompt and no BOS")]
        if self.dropped_no_room:  # only possible when max_prompt_length is not below max_length
            dropped.insert(0, (self.dropped_no_room, "prompt leaves no room"))
        parts.append("dropped " + ", ".join(f"{n} ({why})" for n, why in dropped))
        if self.repeated_prompts:
            parts.append(f"{self.repeated_prompts} responses repeated their prompt (removed from them)")
        if self.boundary_mismatches:
            parts.append(f"{self.boundary_mismatches} prompt/response boundaries tokenized apart")
        if self.skipped_bad:
            reasons = ", ".join(f"{n} {reason} (first at {self.skip_examples[reason]})"
                                for reason, n in self.skip_reasons.most_common(3))
            more = len(self.skip_reasons) - 3
            parts.append(f"skipped {self.skipped_bad} bad records: {reasons}" + (f" and {more} other kinds"
                                                                                  if more > 0 else ""))
        return "; ".join(parts)


def tokenize_records(
    records: Sequence[Record], tokenizer, max_length: int = 1024, max_prompt_length: int = 512,
    on_bad_record: str = "error", split_prompts: bool | None = None,
) -> tuple[PairSet, TokenizeStats]:
    """Apply the rules to `records`, with batched tokenizer calls; bad and degenerate records are counted."""
    stats = TokenizeStats(records=len(records))
    parts, lengths, index, bos = [], [], [], tokenizer.bos_token_id
    encoded_records = encode_records(records, tokenizer, split_prompts)
    for position, (record, encoded) in enumerate(zip(records, encoded_records)):
        if isinstance(encoded, BadRecord):
            if on_bad_record == "error":
                raise UserError(f"{record.where}: {encoded} (use --on_bad_record skip to skip such records)")
            stats.skip(record.where, str(encoded))
            continue
        prompt, chosen, rejected, mismatch = encoded
        stats.boundary_mismatches += mismatch
        stats.repeated_prompts += record.repeated_prompt
        stats.longest_prompt = max(stats.longest_prompt, len(prompt))
        if chosen == rejected:
            stats.dropped_identical += 1
            continue
        if not prompt:
            stats.dropped_empty += 1
            continue
        pair = truncate_pair(prompt, chosen, rejected, max_length, max_prompt_length, stats, bos_id=bos)
        if pair is not None:
            parts.extend(np.asarray(ids, dtype=np.int32) for ids in pair)
            lengths.append([len(ids) for ids in pair])
            index.append(position if record.position is None else record.position)
    stats.pairs = len(index)
    return PairSet._from_parts(parts, np.array(lengths, dtype=np.int64).reshape(-1, 3),
                               np.array(index, dtype=np.int64)), stats


def encode_record(record: Record, tokenizer) -> tuple[list[int], list[int], list[int], int]:
    """Return (prompt_ids, chosen_ids, rejected_ids, number of boundary mismatches) before truncation, with one
    tokenizer call per text (the plain path `encode_records` is tested against)."""
    if isinstance(record.prompt, str):
        prompt_text, full_texts, special = record.prompt, [record.prompt + record.chosen,
                                                          record.prompt + record.rejected], True
    else:
        (prompt_text, full_texts), special = _render_chat(record, tokenizer), False
    encode = lambda text: tokenizer(text, add_special_tokens=special)["input_ids"]  # noqa: E731
    return _split_responses(tokenizer, special, (encode(prompt_text), prompt_text),
                            [(encode(full), full) for full in full_texts])


def encode_records(records: Sequence[Record], tokenizer, split_prompts: bool | None = None
                   ) -> list[tuple | BadRecord]:
    """`encode_record` of every record, or the BadRecord a chat template raised for it: the same ids, with one
    batched tokenizer call per kind of text instead of three calls per record.

    With `split_prompts` (by default where `prefix_stable` proves it exact), a prompt is cut at its last word
    boundary and its head is tokenized once instead of three times: the prompt alone and the two joint texts are
    the head's ids followed by those of the tail, the tail plus the chosen response, the tail plus the rejected."""
    split_prompts = prefix_stable(tokenizer) if split_prompts is None else split_prompts
    specials = tokenizer.bos_token_id, tokenizer.eos_token_id
    out: list = [None] * len(records)
    texts = []  # (position, prompt text, chosen full text, rejected full text, add special tokens)
    for i, record in enumerate(records):
        try:
            if isinstance(record.prompt, str):
                texts.append((i, record.prompt, record.prompt + record.chosen, record.prompt + record.rejected, True))
            else:
                prompt, (chosen, rejected) = _render_chat(record, tokenizer)
                texts.append((i, prompt, chosen, rejected, False))  # the template writes its own special tokens
        except BadRecord as e:
            out[i] = e
    for special in (True, False):
        group = [t for t in texts if t[4] is special]
        cut = [_cut(t[1], t[2], t[3]) if split_prompts else 0 for t in group]
        heads = _encode(tokenizer, [t[1][:c] for t, c in zip(group, cut) if c], special)
        rest = _encode(tokenizer, [t[k][c:] for k in (1, 2, 3) for t, c in zip(group, cut)], special=False)
        plain = _encode(tokenizer, [t[k] for k in (1, 2, 3) for t, c in zip(group, cut) if not c], special)
        n, m = len(group), len(group) - len(heads)
        h = p = 0
        for j, ((i, prompt, chosen, rejected, _), c) in enumerate(zip(group, cut)):
            if c:  # head + the three tails
                ids = [heads[h] + rest[j], heads[h] + rest[n + j], heads[h] + rest[2 * n + j]]
                h += 1
            else:
                ids = [plain[p], plain[m + p], plain[2 * m + p]]
                p += 1
            out[i] = _split_responses(tokenizer, special, (ids[0], prompt), [(ids[1], chosen), (ids[2], rejected)],
                                      specials)
    return out


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """`tokenizer(texts)["input_ids"]`. For a plain Hugging Face fast tokenizer the batch goes to its Rust backend
    directly, after one call through the tokenizer has set the backend's state (no truncation, no padding, its
    special-token splitting), which is all the tokenizer's own call does before the same backend call (here without
    the character offsets, which are not used)."""
    if not texts:
        return []
    first = tokenizer(texts[:1], add_special_tokens=special, return_attention_mask=False)["input_ids"]
    backend = getattr(tokenizer, "_tokenizer", None)
    if len(texts) == 1 or not _plain_fast(tokenizer) or backend is None:
        return first + tokenizer(texts[1:], add_special_tokens=special, return_attention_mask=False)["input_ids"] \
            if len(texts) > 1 else first
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers 0.20+)
    return first + [e.ids for e in encode_batch(texts[1:], add_special_tokens=special)]


def _plain_fast(tokenizer) -> bool:
    """A fast tokenizer whose call is transformers' own (no subclass changes how it encodes)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another layout of transformers: always through the tokenizer's call
        return False
    return isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus


def _cut(prompt: str, chosen_full: str, rejected_full: str) -> int:
    """Where to split the prompt (0: nowhere): its last space between two letters or digits, when both full texts
    continue the prompt's text."""
    if not (chosen_full.startswith(prompt) and rejected_full.startswith(prompt)):
        return 0
    at = prompt.rfind(" ", 0, len(prompt) - 1)
    while at > 0:
        if prompt[at - 1].isalnum() and prompt[at + 1].isalnum():
            return at
        at = prompt.rfind(" ", 0, at)
    return 0


# Pre-tokenizer regexes that split every text at a space between two letters or digits, with both sides
# tokenized as they are alone (GPT-4 / Llama 3 and Qwen2, as transformers writes them).
SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_STABLE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prefix_stable(tokenizer) -> bool:
    """Whether this tokenizer provably tokenizes a text cut at a space between two letters or digits as its two
    parts one after the other: every stage is local at such a space. Normalizers that work character by character;
    pre-tokenizers that split there and tokenize both sides as they are alone (the byte-level regex, whitespace,
    punctuation, digits, Metaspace with splitting, the Llama 3 / Qwen2 regexes); a model that works piece by piece
    without dropout; special tokens added only before the text; no added token with whitespace in it or that
    strips or needs whitespace. Anything else (Llama 2's and Gemma's unsplit Metaspace, a Prepend normalizer, a
    post-processor that appends) is tokenized whole."""
    try:
        return _STABLE[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    stable = False
    if backend is not None:
        spec = json.loads(backend.to_str())
        stable = (_local_normalizer(spec.get("normalizer")) and _splitting_pre_tokenizer(spec.get("pre_tokenizer"))
                  and spec["model"]["type"] in ("BPE", "WordPiece", "WordLevel", "Unigram")
                  and not spec["model"].get("dropout") and _prepending_post_processor(spec.get("post_processor"))
                  and not any(t["lstrip"] or t["rstrip"] or t["single_word"] or any(ch.isspace() for ch in t["content"])
                              for t in spec.get("added_tokens", [])))
    with contextlib.suppress(TypeError):
        _STABLE[tokenizer] = stable
    return stable


def _local_normalizer(spec) -> bool:
    if spec is None:
        return True
    if spec["type"] == "Sequence":
        return all(_local_normalizer(n) for n in spec["normalizers"])
    if spec["type"] == "Replace":  # one character replaced by a string is local, unless it is the space itself
        pattern = spec["pattern"].get("String", "xx")
        return len(pattern) == 1 and not pattern.isspace()
    return spec["type"] in ("NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "BertNormalizer")


def _splitting_pre_tokenizer(spec) -> bool:
    """Splits every text at a space between letters or digits, each side pre-tokenized as it is alone."""
    if spec is None:
        return False
    kind = spec["type"]
    if kind == "Sequence":  # one stage splits at spaces, the others split only within pieces, character by character
        stages = spec["pretokenizers"]
        return any(_splitting_pre_tokenizer(p) for p in stages) and all(
            _splitting_pre_tokenizer(p) or _local_pre_tokenizer(p) for p in stages)
    if kind == "ByteLevel":
        return spec["use_regex"]
    if kind == "Metaspace":
        return spec["split"]
    if kind == "Split":
        return spec["pattern"].get("Regex") in SPLIT_PATTERNS and spec["behavior"] == "Isolated" and not spec["invert"]
    if kind == "CharDelimiterSplit":
        return spec["delimiter"] == " "
    return kind in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer")


def _local_pre_tokenizer(spec) -> bool:
    """Splits pieces only by looking at their own characters (never at a space between two letters or digits)."""
    return spec["type"] in ("Punctuation", "Digits") or (spec["type"] == "ByteLevel" and not spec["use_regex"])


def _prepending_post_processor(spec) -> bool:
    if spec is None or spec["type"] == "ByteLevel":
        return True
    if spec["type"] == "Sequence":
        return all(_prepending_post_processor(p) for p in spec["processors"])
    if spec["type"] == "TemplateProcessing":
        return bool(spec["single"]) and "Sequence" in spec["single"][-1]
    return False


def _split_responses(tokenizer, special: bool, prompt: tuple, fulls: list[tuple], specials: tuple | None = None):
    """The rules of `encode_record`, from the (ids, text) of the prompt and of the two full texts. `specials`:
    the tokenizer's (BOS, EOS) ids, looked up once by the caller."""
    bos, eos = specials or (tokenizer.bos_token_id, tokenizer.eos_token_id)
    prompt_ids, prompt_text = _dedupe_bos(prompt[0], bos), prompt[1]
    responses, mismatches = [], 0
    for full_ids, full in fulls:
        full_ids = _dedupe_bos(full_ids, bos)
        if full_ids[: len(prompt_ids)] == prompt_ids:
            ids = full_ids[len(prompt_ids):]
        else:
            mismatches += 1
            ids = tokenizer(full[_common_prefix(prompt_text, full):], add_special_tokens=False)["input_ids"]
        responses.append(_with_eos(ids, eos, chat=not special))
    return prompt_ids, responses[0], responses[1], min(mismatches, 1)


def encode_prompt(prompt: str | list, tokenizer, where: str, max_prompt_length: int) -> tuple[list[int], bool]:
    """A prompt's ids as training tokenizes it (`encode_record`): text with the tokenizer's special tokens,
    messages through the chat template with the generation prompt. Longer than `max_prompt_length`, it keeps its
    end (and its BOS), as in training. Returns (ids, whether it was cut)."""
    if isinstance(prompt, str):
        ids = _dedupe_bos(tokenizer(prompt, add_special_tokens=True)["input_ids"], tokenizer.bos_token_id)
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{where}: conversational prompts need a tokenizer with a chat template; this "
                            "tokenizer has none (set one in tokenizer_config.json or use text prompts)")
        try:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises its own errors for templates that reject a conversation
            raise UserError(f"{where}: the chat template rejected this conversation ({e})") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_prompt_length:
        return ids, False
    bos = tokenizer.bos_token_id
    head = ids[:1] if bos is not None and ids[0] == bos else []
    return head + ids[len(ids) - (max_prompt_length - len(head)):], True


def _render_chat(record: Record, tokenizer) -> tuple[str, list[str]]:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{record.where}: conversational records need a tokenizer with a chat template; this "
                        "tokenizer has none (set one in tokenizer_config.json or use text records)")
    try:
        prompt = tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True)
        full = [tokenizer.apply_chat_template(record.prompt + response, tokenize=False)
                for response in (record.chosen, record.rejected)]
    except Exception as e:  # jinja raises its own errors for templates that reject a conversation
        raise BadRecord(f"the chat template rejected this conversation ({e})") from None
    return prompt, full


def _dedupe_bos(ids: list[int], bos: int | None) -> list[int]:
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def _with_eos(ids: list[int], eos: int | None, chat: bool) -> list[int]:
    if eos is None:
        return ids
    if chat and eos in ids:
        return ids
    if ids and ids[-1] == eos:
        return ids
    return ids + [eos]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def truncate_pair(prompt, chosen, rejected, max_length, max_prompt_length, stats: TokenizeStats, bos_id=None):
    """Apply the truncation rules; return (prompt, chosen, rejected) or None when the pair is dropped."""
    cut = truncate_responses(prompt, [chosen, rejected], max_length, max_prompt_length, stats, bos_id)
    if cut is None:
        return None
    prompt, (chosen, rejected) = cut
    if chosen == rejected:
        stats.dropped_identical += 1  # only differed after the cut
        return None
    return prompt, chosen, rejected


def truncate_responses(prompt, responses: list, max_length, max_prompt_length, stats: TokenizeStats, bos_id=None):
    """The prompt keeps its end (and its BOS) within `max_prompt_length`; each response is cut to the room left
    within `max_length` (counted as chosen, then rejected). Returns (prompt, responses), or None without room."""
    if len(prompt) > max_prompt_length:
        stats.truncated_prompts += 1
        keep_bos = prompt[:1] if max_prompt_length > 1 and bos_id is not None and prompt[0] == bos_id else []
        prompt = keep_bos + prompt[len(prompt) - (max_prompt_length - len(keep_bos)):]
    room = max_length - len(prompt)
    if room <= 0:
        stats.dropped_no_room += 1
        return None
    for k, name in enumerate(("truncated_chosen", "truncated_rejected")[: len(responses)]):
        if len(responses[k]) > room:
            setattr(stats, name, getattr(stats, name) + 1)
    return prompt, [r[:room] for r in responses]
