"""The trained policy as the reward model it is: `fastdpo score` and `fastdpo rank`.

DPO's policy defines the implicit reward `r(x, y) = β log π_θ(y|x)/π_ref(y|x) + β log Z(x)` (Eq 9); `β log Z(x)`
depends on the prompt only, so it cancels whenever responses to the same prompt are compared, and the reward is
reported without it: `reward = β (policy_logps − reference_logps)`. With `--length_normalize` it is divided by
the response's tokens (β times the mean per-token log-ratio), which compares responses of different lengths
without favouring the short.

Each record of the data is one of:
- a preference pair (`prompt`, `chosen`, `rejected`, or the implicit-prompt forms of training): both rewards, the
  margin, whether the chosen one wins; accuracy and mean margin overall and per value of `--subset_field` (a
  RewardBench-style table);
- a prompt and one response (`--response_field`, default `response`): its reward;
- a prompt and a list of candidates (`--candidates_field`, default `candidates`): each one's reward; `rank`
  reorders them, best first (best-of-N with the policy as its own reward model).

Responses are tokenized as training tokenizes them (the EOS appended) and scored two at a time as pairs, with the
layouts and log-prob code of training, so a pair's rewards are `fastdpo eval --per_pair_out`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastdpo.attention import set_per_segment
from fastdpo.config import Config
from fastdpo.data import BadRecord, Fields, Record, field_value, iter_raw, parse_record
from fastdpo.errors import UserError
from fastdpo.evaluation import pair_logps, start_scoring
from fastdpo.logps import LogpsModule, choose_layout
from fastdpo.models import Inputs, attention_implementation, policy_and_reference, set_attention
from fastdpo.tokenize import TokenizedPair, TokenizeStats, encode_records, truncate_responses


@dataclass
class ScoreFields:
    """Where the records hold what `score` and `rank` read, beside the prompt / chosen / rejected fields."""

    response: str = "response"
    candidates: str = "candidates"
    subset: str | None = None  # a field whose values split the pairs' accuracy table


@dataclass
class Scored:
    """One record of the data: its kind ("pair", "response" or "candidates"), where it was, its responses'
    texts (as given), and, once scored, each response's reward and token count."""

    kind: str
    where: str
    index: int
    prompt: object
    responses: list
    subset: object = None
    rewards: list = field(default_factory=list)
    tokens: list = field(default_factory=list)


@dataclass
class ScoreResult:
    summary: dict  # records of each kind; for the pairs accuracy and mean margin, overall and per subset
    rows: list[dict] = field(default_factory=list)  # one per record, in data order
    items: list[Scored] = field(default_factory=list, repr=False)  # the records, with their texts


def read_scored(source, split: str, fields: Fields, extra: ScoreFields, name: str = "data") -> list[Scored]:
    """Every record of `source` as a `Scored` of its kind; a bad record is one line naming it."""
    out = []
    for index, (where, raw) in enumerate(iter_raw(source, split, name)):
        try:
            if isinstance(raw, BadRecord):
                raise raw
            out.append(_scored(raw, fields, extra, where, index))
        except BadRecord as e:
            raise UserError(f"{where}: {e}") from None
    if not out:
        raise UserError(f"{source if isinstance(source, str) else name}: no records found")
    return out


def _scored(raw, fields: Fields, extra: ScoreFields, where: str, index: int) -> Scored:
    subset = raw.get(extra.subset) if isinstance(raw, dict) and extra.subset else None
    if isinstance(raw, dict) and extra.candidates in raw:
        candidates = raw[extra.candidates]
        if not isinstance(candidates, list) or not candidates:
            raise BadRecord(f"field {extra.candidates!r} must be a non-empty list of responses")
        prompt = field_value(raw, fields.prompt, fields)
        for k, candidate in enumerate(candidates):  # each text or messages, not blank, of the prompt's kind
            name = f"{extra.candidates}[{k}]"
            _same_kind(prompt, field_value({name: candidate}, name, fields), fields.prompt, name)
        return Scored("candidates", where, index, prompt, candidates, subset)
    if isinstance(raw, dict) and extra.response in raw:
        prompt = field_value(raw, fields.prompt, fields)
        response = _same_kind(prompt, field_value(raw, extra.response, fields), fields.prompt, extra.response)
        return Scored("response", where, index, prompt, [response], subset)
    record = parse_record(raw, fields, where)
    return Scored("pair", where, index, record.prompt, [record.chosen, record.rejected], subset)


def _same_kind(prompt, response, prompt_name: str, response_name: str):
    """`response`, if it is text beside a text prompt or messages beside messages (else BadRecord)."""
    if isinstance(prompt, str) != isinstance(response, str):
        kinds = lambda v: "text" if isinstance(v, str) else "a list of messages"  # noqa: E731
        raise BadRecord(f"field {prompt_name!r} is {kinds(prompt)} but field {response_name!r} is "
                        f"{kinds(response)}; both must be text or both messages")
    return response


def tokenized_pairs(items: list[Scored], tokenizer, cfg: Config) -> tuple[list[TokenizedPair], list[tuple]]:
    """The responses as pairs of the same prompt (two at a time; one left over paired with itself), tokenized as
    training tokenizes pairs; and for each pair, (item, first response, second response or None)."""
    records, slots = [], []
    for n, item in enumerate(items):
        for k in range(0, len(item.responses), 2):
            second = k + 1 if k + 1 < len(item.responses) else None
            records.append(Record(item.prompt, item.responses[k], item.responses[second if second else k],
                                  item.where))
            slots.append((n, k, second))
    pairs, stats = [], TokenizeStats()
    for i, (record, encoded) in enumerate(zip(records, encode_records(records, tokenizer))):
        if isinstance(encoded, BadRecord):
            raise UserError(f"{record.where}: {encoded}")
        prompt, first, second, _ = encoded
        cut = truncate_responses(prompt, [first, second], cfg.max_length, cfg.max_prompt_length, stats,
                                 bos_id=tokenizer.bos_token_id)
        if cut is None:
            raise UserError(f"{record.where}: the prompt leaves no room for a response within --max_length "
                            f"{cfg.max_length}; raise --max_length or lower --max_prompt_length")
        pairs.append(TokenizedPair(cut[0], *cut[1], index=i))
    return pairs, slots


def run_score(cfg: Config, extra: ScoreFields, inputs: Inputs | None = None, length_normalize: bool = False,
              log=None) -> ScoreResult:
    """The `score` command (and `rank`'s scores): the implicit reward of every response of `--data`."""
    inputs = inputs or Inputs()
    if inputs.model is None and not cfg.model:
        raise UserError("--model: score needs the policy (a model directory, hub id or adapter directory)",
                        exit_code=2)
    if inputs.ref_model is None and not cfg.ref_model:
        raise UserError("--ref_model: the implicit reward β log π/π_ref needs the reference the policy was trained "
                        "from (its starting model)", exit_code=2)
    if inputs.data is None and not cfg.data:
        raise UserError("--data: score needs responses to score (pairs, prompt + response, or prompt + "
                        "candidates)", exit_code=2)
    runtime, tokenizer, cfg, log = start_scoring(cfg, inputs, "score", log)
    fields = Fields(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    items = read_scored(inputs.data if inputs.data is not None else cfg.data, cfg.data_split, fields, extra)
    pairs, slots = tokenized_pairs(items, tokenizer, cfg)
    policy, reference = policy_and_reference(cfg, inputs, runtime.device)
    attention = set_attention([policy, reference], attention_implementation(cfg, runtime.device),
                              cfg.attn_implementation != "auto")
    log(f"fastdpo: attention: {attention}")
    layout = choose_layout(cfg, [policy, reference], [pairs], tokenizer.pad_token_id, runtime.device, log)
    set_per_segment([policy, reference], layout.per_segment)
    modules = {"policy": LogpsModule(policy, layout), "reference": LogpsModule(reference, layout)}
    logps = pair_logps(modules, layout, pairs, tokenizer.pad_token_id, cfg.batch_size, runtime)
    for item in items:
        item.rewards, item.tokens = [None] * len(item.responses), [None] * len(item.responses)
    for p, (n, first, second) in enumerate(slots):
        for side, k in ((0, first), (1, second)):
            if k is None:
                continue
            tokens = len(pairs[p].chosen_ids if side == 0 else pairs[p].rejected_ids)
            reward = cfg.beta * (logps["policy"][p][side] - logps["reference"][p][side])
            items[n].rewards[k] = reward / tokens if length_normalize else reward
            items[n].tokens[k] = tokens
    return ScoreResult(summarize(items), [row_of(item) for item in items], items)


def row_of(item: Scored) -> dict:
    row = {"index": item.index, "kind": item.kind}
    if item.subset is not None:
        row["subset"] = item.subset
    if item.kind == "pair":
        chosen, rejected = item.rewards
        row.update(chosen_reward=chosen, rejected_reward=rejected, margin=chosen - rejected,
                   correct=chosen > rejected, chosen_tokens=item.tokens[0], rejected_tokens=item.tokens[1])
    elif item.kind == "response":
        row.update(reward=item.rewards[0], tokens=item.tokens[0])
    else:
        row.update(rewards=item.rewards, tokens=item.tokens)
    return row


def summarize(items: list[Scored]) -> dict:
    """Counts per kind; for the pairs, reward accuracy and mean margin overall and per subset."""
    summary = {f"{kind}_records": sum(i.kind == kind for i in items) for kind in ("pair", "response", "candidates")}
    pairs = [i for i in items if i.kind == "pair"]
    if pairs:
        summary.update(_accuracy(pairs))
        subsets = dict.fromkeys(str(i.subset) for i in pairs if i.subset is not None)
        if subsets:
            summary["subsets"] = {s: _accuracy([i for i in pairs if str(i.subset) == s]) for s in subsets}
    return summary


def _accuracy(pairs: list[Scored]) -> dict:
    margins = [i.rewards[0] - i.rewards[1] for i in pairs]
    return {"pairs": len(pairs), "accuracy": sum(m > 0 for m in margins) / len(pairs),
            "mean_margin": sum(margins) / len(pairs)}


def ranked(result: ScoreResult) -> list[dict]:
    """`rank`'s rows: each candidates record with its candidates reordered by reward, best first (`order`: their
    positions in the record)."""
    rows = []
    for item in result.items:
        if item.kind != "candidates":
            continue
        order = sorted(range(len(item.rewards)), key=lambda k: -item.rewards[k])
        rows.append({"index": item.index, "prompt": item.prompt, "candidates": [item.responses[k] for k in order],
                     "rewards": [item.rewards[k] for k in order], "tokens": [item.tokens[k] for k in order],
                     "order": order})
    return rows


def format_summary(summary: dict) -> str:
    """The RewardBench-style table of the pairs (overall, then per subset), and the other kinds' counts."""
    lines = []
    if summary.get("pairs"):
        lines += [f"{'subset':<24} {'pairs':>6} {'accuracy':>9} {'mean margin':>12}"]
        for name, s in [("all", summary), *summary.get("subsets", {}).items()]:
            lines.append(f"{name:<24} {s['pairs']:>6} {s['accuracy']:>9.3f} {s['mean_margin']:>12.4f}")
    for kind, what in (("response", "one response"), ("candidates", "candidates")):
        if summary[f"{kind}_records"]:
            lines.append(f"{summary[f'{kind}_records']} records of a prompt and {what}")
    return "\n".join(lines)
