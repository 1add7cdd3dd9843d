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
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    skipped_bad: int = 0  # bad records skipped at load time (--on_bad_record skip)
    notes: list[str] = field(default_factory=list)

    def summary(self, name: str = "data") -> str:
        parts = [f"{name}: {self.records} records -> {self.pairs} pairs"]
        trunc = [(self.truncated_prompts, "prompts"), (self.truncated_chosen, "chosen"),
                 (self.truncated_rejected, "rejected")]
        parts.append("truncated " + ", ".join(f"{n} {what}" for n, what in trunc))
        dropped = [(self.dropped_no_room, "prompt leaves no room"), (self.dropped_identical, "chosen == rejected"),
                   (self.dropped_empty, "empty prompt and no BOS")]
        parts.append("dropped " + ", ".join(f"{n} ({why})" for n, why in dropped))
        if self.boundary_mismatches:
            parts.append(f"{self.boundary_mismatches} prompt/response boundaries tokenized apart")
        if self.skipped_bad:
            parts.append(f"skipped {self.skipped_bad} bad records")
        return "; ".join(parts)


def tokenize_records(
    records: list[Record], tokenizer, max_length: int = 1024, max_prompt_length: int = 512,
    on_bad_record: str = "error",
) -> tuple[list[TokenizedPair], TokenizeStats]:
    stats = TokenizeStats(records=len(records))
    pairs = []
    for index, record in enumerate(records):
        try:
            prompt, chosen, rejected, mismatch = encode_record(record, tokenizer)
        except BadRecord as e:
            if on_bad_record == "error":
                raise UserError(f"{record.where}: {e} (use --on_bad_record skip to skip such records)") from None
            stats.skipped_bad += 1
            continue
        stats.boundary_mismatches += mismatch
        if chosen == rejected:
            stats.dropped_identical += 1
            continue
        if not prompt:
            stats.dropped_empty += 1
            continue
        pair = truncate_pair(prompt, chosen, rejected, max_length, max_prompt_length, stats,
                             bos_id=tokenizer.bos_token_id)
        if pair is not None:
            pairs.append(TokenizedPair(*pair, index=index if record.position is None else record.position))
    stats.pairs = len(pairs)
    return pairs, stats


def encode_record(record: Record, tokenizer) -> tuple[list[int], list[int], list[int], int]:
    """Return (prompt_ids, chosen_ids, rejected_ids, number of boundary mismatches) before truncation."""
    if isinstance(record.prompt, str):
        prompt_text = record.prompt
        full_texts = [record.prompt + record.chosen, record.prompt + record.rejected]
        special = True
    else:
        prompt_text, full_texts = _render_chat(record, tokenizer)
        special = False  # the template writes its own special tokens
    prompt_ids = _dedupe_bos(tokenizer(prompt_text, add_special_tokens=special)["input_ids"], tokenizer)
    responses, mismatches = [], 0
    for full in full_texts:
        full_ids = _dedupe_bos(tokenizer(full, add_special_tokens=special)["input_ids"], tokenizer)
        if full_ids[: len(prompt_ids)] == prompt_ids:
            ids = full_ids[len(prompt_ids):]
        else:
            mismatches += 1
            ids = tokenizer(full[_common_prefix(prompt_text, full):], add_special_tokens=False)["input_ids"]
        responses.append(_with_eos(ids, tokenizer.eos_token_id, chat=not special))
    return prompt_ids, responses[0], responses[1], min(mismatches, 1)


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


def _dedupe_bos(ids: list[int], tokenizer) -> list[int]:
    bos = tokenizer.bos_token_id
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
    if len(prompt) > max_prompt_length:
        stats.truncated_prompts += 1
        keep_bos = prompt[:1] if max_prompt_length > 1 and bos_id is not None and prompt[0] == bos_id else []
        prompt = keep_bos + prompt[len(prompt) - (max_prompt_length - len(keep_bos)):]
    room = max_length - len(prompt)
    if room <= 0:
        stats.dropped_no_room += 1
        return None
    if len(chosen) > room:
        stats.truncated_chosen += 1
        chosen = chosen[:room]
    if len(rejected) > room:
        stats.truncated_rejected += 1
        rejected = rejected[:room]
    if chosen == rejected:
        stats.dropped_identical += 1  # only differed after the cut
        return None
    return prompt, chosen, rejected



def load_pairs(source, split: str, tokenizer, *, fields, max_length: int, max_prompt_length: int,
               on_bad_record: str = "error", name: str = "data") -> tuple[list[TokenizedPair], TokenizeStats]:
    """Read, validate and tokenize a preference data source (a path or name, or an object in memory passed as the
    option `name`); a source with no usable pair is an error."""
    from fastdpo.data import describe, load_records

    loaded = load_records(source, split=split, fields=fields, on_bad_record=on_bad_record, name=name)
    pairs, stats = tokenize_records(loaded.records, tokenizer, max_length, max_prompt_length, on_bad_record)
    stats.records += loaded.skipped
    stats.skipped_bad += loaded.skipped
    if not pairs:
        label = "eval data" if name == "eval_data" else "data"
        raise UserError(f"{describe(source, name)}: no usable preference pair left ({stats.summary(label)})")
    return pairs, stats
