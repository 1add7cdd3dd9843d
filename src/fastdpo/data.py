"""Load preference records from files, Hugging Face data sets or objects in memory, validate them, and make the
prompt explicit.

A source is a path (.jsonl, .json, .parquet, a `save_to_disk` directory), a hub data set name, a built-in set
(`builtin:example`, `builtin:example-eval`), or, from the Python API, a list of dicts, a `datasets.Dataset` or a
`datasets.DatasetDict`. A record leaves this module as a `Record`: `prompt`, `chosen` and `rejected` are either
all strings (text form) or all lists of `{"role", "content"}` messages (conversational form). Implicit-prompt
records (no prompt field) get their prompt from the shared beginning of `chosen` and `rejected`.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterator

from fastdpo.errors import UserError

BUILTIN_DATA = {"builtin:example": "example/train.jsonl", "builtin:example-eval": "example/eval.jsonl"}


def asset_path(relative: str) -> str:
    """A file the package ships under fastdpo/assets/."""
    return str(resources.files("fastdpo").joinpath("assets", relative))


def resolve_data(path: str, flag: str = "data") -> str:
    """`builtin:example` and `builtin:example-eval` name the preference set the package ships."""
    if path in BUILTIN_DATA:
        return asset_path(BUILTIN_DATA[path])
    if path.startswith("builtin:"):
        raise UserError(f"--{flag}: unknown built-in data set {path!r}; built-in: {', '.join(BUILTIN_DATA)}",
                        exit_code=2)
    return path


def describe(source, name: str) -> str:
    """How messages name a source: its path, or the keyword it was passed as (`data`, `eval_data`)."""
    return source if isinstance(source, str) else name

Messages = list  # list[dict[str, str]] with keys "role" and "content"


@dataclass
class Record:
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    where: str  # "file.jsonl:12", for messages that point at the source
    position: int | None = None  # the record's position in the source, bad records included
    repeated_prompt: bool = False  # the responses repeated the prompt, which was removed from them


@dataclass
class Fields:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"

    def flag(self, name: str) -> str:
        """The flag that names the field `name` holds."""
        return {self.prompt: "--prompt_field", self.chosen: "--chosen_field"}.get(name, "--rejected_field")


@dataclass
class LoadResult:
    records: list[Record]
    skipped: int = 0  # bad records skipped with on_bad_record="skip"
    skip_reasons: list[str] = field(default_factory=list)  # the first few, for the report
    bad: list[tuple[str, str]] = field(default_factory=list)  # (where, what was wrong) of every skipped record


SKIP = "skip such records with --on_bad_record skip"


class BadRecord(Exception):
    """One record is unusable; the loader turns it into a one-line UserError or a counted skip. `fix`: what the
    user can do about it."""

    def __init__(self, message: str, fix: str = SKIP):
        super().__init__(message)
        self.fix = fix

    def error(self, where: str) -> UserError:
        return UserError(f"{where}: {self} ({self.fix})")


def iter_records(source, split: str = "train", fields: Fields | None = None, name: str = "data"
                 ) -> Iterator[Record | tuple[str, BadRecord]]:
    """Every record of `source` in order (a path, a hub or built-in name, or an object in memory; see the module
    docstring): a Record, or (where, BadRecord) for one that cannot be used. `name`: the option the source was
    given as, for messages."""
    fields = fields or Fields()
    raws = _iter_raw(resolve_data(source, name), split, name) if isinstance(source, str) else \
        _iter_memory(source, split, name)
    for position, (where, raw) in enumerate(raws):
        try:
            if isinstance(raw, BadRecord):
                raise raw
            record = parse_record(raw, fields, where)
        except BadRecord as e:
            yield where, e
            continue
        record.position = position
        yield record


def load_records(
    source, split: str = "train", fields: Fields | None = None, on_bad_record: str = "error", name: str = "data"
) -> LoadResult:
    """Every usable record of `source` in a list; bad records stop the load or are skipped and counted."""
    if on_bad_record not in ("error", "skip"):
        raise UserError(f"--on_bad_record must be 'error' or 'skip', got {on_bad_record!r}", exit_code=2)
    result = LoadResult(records=[])
    for item in iter_records(source, split, fields, name):
        if isinstance(item, Record):
            result.records.append(item)
            continue
        where, e = item
        if on_bad_record == "error":
            raise e.error(where)
        result.skipped += 1
        result.bad.append((where, str(e)))
        if len(result.skip_reasons) < 3:
            result.skip_reasons.append(f"{where}: {e}")
    if not result.records:
        detail = f"; {result.skipped} bad records were skipped" if result.skipped else ""
        raise UserError(f"{describe(source, name)}: no preference records found{detail}")
    return result


def iter_raw(source, split: str = "train", name: str = "data") -> Iterator[tuple[str, Any]]:
    """(where, raw object or BadRecord) for each record of `source` (a path or name, or an object in memory)."""
    return _iter_raw(resolve_data(source, name), split, name) if isinstance(source, str) else \
        _iter_memory(source, split, name)


def field_value(raw: dict, name: str, fields: Fields) -> str | Messages:
    """Field `name` of a record: text that is not blank, or a list of messages (else BadRecord)."""
    return _response(raw, name, fields)


def load_prompts(source, split: str = "train", fields: Fields | None = None, name: str = "data",
                 on_bad_record: str = "error", limit: int = 0) -> list[tuple[str, str | Messages]]:
    """Each distinct prompt of `source` once, in order of first appearance, with where it was first seen: records
    that hold only a prompt (text or messages), or preference records (their prompt, stated or the responses'
    shared beginning). A bad record is a one-line error, or skipped with `on_bad_record="skip"`; `limit`: stop
    once that many are found (0: all)."""
    fields = fields or Fields()
    raws = iter_raw(source, split, name)
    prompts: dict[str, tuple[str, str | Messages]] = {}
    for where, raw in raws:
        try:
            if isinstance(raw, BadRecord):
                raise raw
            if isinstance(raw, dict) and fields.prompt in raw and fields.chosen not in raw:
                prompt = _response(raw, fields.prompt, fields)  # a prompt alone: text or messages, not empty
            else:
                prompt = parse_record(raw, fields, where).prompt
        except BadRecord as e:
            if on_bad_record == "skip":
                continue
            raise UserError(f"{where}: {e}") from None
        prompts.setdefault(json.dumps(prompt, sort_keys=True), (where, prompt))
        if limit and len(prompts) >= limit:
            break
    if not prompts:
        raise UserError(f"{describe(source, name)}: no prompts found")
    return list(prompts.values())


def _iter_memory(source, split: str, name: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, raw record) for a list of dicts, a datasets.Dataset or a datasets.DatasetDict."""
    datasets = sys.modules.get("datasets")  # an object of its types exists only once the user imported it
    if datasets is not None and isinstance(source, datasets.DatasetDict):
        if split not in source:
            key = split_flag(name).removeprefix("--")
            raise UserError(f"{name}: no split {split!r} (it has {sorted(source)}); choose one with {key}=")
        source, name = source[split], f"{name}[{split!r}]"
    elif datasets is not None and isinstance(source, datasets.IterableDataset):
        raise UserError(f"{name}: a streaming IterableDataset cannot be trained on here; pass a datasets.Dataset "
                        "(load_dataset(..., streaming=False)) or a list of dicts")
    if not isinstance(source, (list, tuple)) and not (datasets is not None and isinstance(source, datasets.Dataset)):
        raise UserError(f"{name}: expected a path, a list of dicts, a datasets.Dataset or a datasets.DatasetDict, "
                        f"got {type(source).__name__}")
    for i, raw in enumerate(source):
        yield f"{name}[{i}]", raw


def _iter_raw(path: str, split: str, name: str = "data") -> Iterator[tuple[str, Any]]:
    """Yield (where, raw object or BadRecord) for each record of the source."""
    if os.path.isdir(path):
        yield from _iter_datasets_dir(path, split, name)
    elif os.path.isfile(path):
        lower = path.lower().removesuffix(".gz")
        if lower.endswith(".jsonl"):
            yield from _iter_jsonl(path)
        elif lower.endswith(".json"):
            yield from _iter_json(path)
        elif lower.endswith(".parquet") and not path.lower().endswith(".gz"):
            yield from _iter_parquet(path)
        else:
            raise UserError(f"{path}: unknown data format; use .jsonl, .json (either may be .gz), .parquet or a "
                            "datasets directory")
    elif path.endswith((".jsonl", ".json", ".parquet", ".gz")) or path.startswith((".", "/", "~")):
        raise UserError(f"{path}: no such file or directory")
    else:
        yield from _iter_hub(path, split, name)


def _open(path: str):
    """The file's bytes, through gzip for a .gz file."""
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _lines(path: str, lines) -> Iterator[tuple[str, Any]]:
    """JSON lines: (where, object or BadRecord) for each non-blank line; a UTF-8 BOM at the start is dropped."""
    for lineno, line in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        if lineno == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield where, BadRecord(f"bytes that are not UTF-8 (at byte {e.start} of the line)")
            continue
        if not text.strip():
            continue
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as e:
            yield where, BadRecord(f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    try:
        with _open(path) as f:
            yield from _lines(path, f)
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise UserError(f"{path}: cannot be read ({e})") from None


def _iter_json(path: str) -> Iterator[tuple[str, Any]]:
    """A list of objects (or {"data": [...]}), or JSON lines in a .json file (what `Dataset.to_json` writes)."""
    try:
        with _open(path) as f:
            raw = f.read().removeprefix(b"\xef\xbb\xbf")
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot be read ({e})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: bytes that are not UTF-8 (at byte {e.start})") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and raw.lstrip()[:1] == b"{":  # one object per line
            yield from _lines(path, raw.splitlines())
            return
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, dict):  # a single record
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: a .json data file must hold a list of objects (one per preference pair) or one "
                        "object per line")
    for i, raw_record in enumerate(data):
        yield f"{path}: item {i}", raw_record


def datasets_module():
    try:
        import datasets
    except ImportError:
        raise UserError("reading parquet files and Hugging Face data sets needs `pip install fastdpo[datasets]`")
    return datasets


def _iter_parquet(path: str) -> Iterator[tuple[str, Any]]:
    ds = datasets_module().Dataset.from_parquet(path)
    for i, raw in enumerate(ds):
        yield f"{path}: row {i}", raw


def split_flag(name: str) -> str:
    """The flag that chooses the split of the source given as `name`."""
    return "--eval_data_split" if name == "eval_data" else "--data_split"


def _iter_datasets_dir(path: str, split: str, name: str = "data") -> Iterator[tuple[str, Any]]:
    datasets = datasets_module()
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise UserError(f"{path}: a directory, but not one written by datasets' save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: no split {split!r} (it has {sorted(ds)}); choose one with {split_flag(name)}")
        ds = ds[split]
    for i, raw in enumerate(ds):
        yield f"{path}[{split}]: row {i}", raw


def _iter_hub(path: str, split: str, name: str = "data") -> Iterator[tuple[str, Any]]:
    datasets = datasets_module()
    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # the hub raises many types: offline, missing, gated, a wrong split
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a local file and could not be loaded from the hub ({first}; the split comes "
                        f"from {split_flag(name)})") from None
    for i, raw in enumerate(ds):
        yield f"{path}[{split}]: row {i}", raw


# --- validation -----------------------------------------------------------------------------------------------


def parse_record(raw: Any, fields: Fields, where: str) -> Record:
    """Validate one raw record and return it with an explicit prompt."""
    if not isinstance(raw, dict):
        raise BadRecord(f"expected a JSON object with fields {fields.chosen!r} and {fields.rejected!r}, "
                        f"got {type(raw).__name__}")
    chosen = _response(raw, fields.chosen, fields)
    rejected = _response(raw, fields.rejected, fields)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise BadRecord(f"field {fields.chosen!r} and field {fields.rejected!r} must both be text or both be "
                        "lists of messages")
    prompt = raw.get(fields.prompt)
    repeated = False
    if prompt is None or (isinstance(prompt, str) and not isinstance(chosen, str)):
        # No prompt, or a text prompt beside whole conversations: the prompt is the shared beginning.
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, fields)
    elif isinstance(prompt, str):
        repeated, chosen, rejected = strip_repeated_prompt(prompt, chosen, rejected)
    elif isinstance(prompt, list):
        _check_messages(prompt, fields.prompt, allow_empty=False)
        if isinstance(chosen, str):
            raise BadRecord(f"field {fields.prompt!r} is a list of messages but field {fields.chosen!r} is text")
        repeated, chosen, rejected = strip_repeated_prompt(prompt, chosen, rejected)
    else:
        raise BadRecord(f"field {fields.prompt!r} must be text or a list of messages, got {type(prompt).__name__}")
    return Record(prompt=prompt, chosen=chosen, rejected=rejected, where=where, repeated_prompt=repeated)


def strip_repeated_prompt(prompt, chosen, rejected) -> tuple[bool, Any, Any]:
    """Responses that start with their prompt (a common export shape: whole conversations in `chosen` and
    `rejected` beside the prompt) -> (True, the responses without it). For conversations the repeated part may
    also be the prompt's last messages alone (the user turn without the system message). Each response keeps at
    least one message or character."""
    if chosen[: len(prompt)] == prompt == rejected[: len(prompt)] and min(len(chosen), len(rejected)) > len(prompt):
        return True, chosen[len(prompt):], rejected[len(prompt):]
    if isinstance(prompt, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        for n in range(shared, 0, -1):  # the longest shared start that is the prompt's end
            if prompt[-n:] == chosen[:n]:
                return True, chosen[n:], rejected[n:]
    return False, chosen, rejected


def _response(raw: dict, name: str, fields: Fields) -> str | Messages:
    if name not in raw:
        present = ", ".join(repr(k) for k in sorted(raw, key=str)[:12]) or "none"
        raise BadRecord(f"missing field {name!r} (the record has {present})",
                        fix=f"name the field that holds it with {fields.flag(name)} FIELD, or {SKIP}")
    value = raw[name]
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(f"field {name!r} is an empty string")
        return value
    if isinstance(value, list):
        _check_messages(value, name, allow_empty=False)
        return value
    raise BadRecord(f"field {name!r} must be text or a list of messages, got {type(value).__name__}")


def _check_messages(messages: list, name: str, allow_empty: bool) -> None:
    if not messages and not allow_empty:
        raise BadRecord(f"field {name!r} is an empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRecord(f"field {name!r}, message {i}: expected an object with string 'role' and 'content'")


def split_implicit_prompt(chosen: str | Messages, rejected: str | Messages, fields: Fields | None = None):
    """Split whole chosen / rejected texts or conversations into (prompt, chosen, rejected).

    Conversations: the shared leading messages are the prompt. Texts: the shared prefix, cut back to the last
    whitespace so that no word is split ("The sky is blue" / "The sky is black" -> "The sky is", " blue",
    " black").
    """
    fields = fields or Fields()
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise BadRecord(f"no prompt field {fields.prompt!r} and {fields.chosen!r} / {fields.rejected!r} share "
                            "no leading messages to use as the prompt")
        if n == len(chosen) or n == len(rejected):
            raise BadRecord(f"field {fields.chosen!r} and field {fields.rejected!r} leave no response after the "
                            "shared prompt messages")
        return chosen[:n], chosen[n:], rejected[n:]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) and n == len(rejected):
        return chosen, chosen, rejected  # identical: dropped later as degenerate, with a count
    # Cut back to whitespace unless both continue with whitespace or one ends right here at a word boundary.
    cut = n
    if not (_boundary(chosen, n) and _boundary(rejected, n)):
        cut = _last_space_before(chosen, n)
    while cut > 0 and cut >= min(len(chosen), len(rejected)):  # each response keeps at least one word
        cut = _last_space_before(chosen, cut)
    prompt = chosen[:cut].rstrip()
    cut = len(prompt)
    return prompt, chosen[cut:], rejected[cut:]


def _boundary(text: str, i: int) -> bool:
    return i == len(text) or text[i].isspace()


def _last_space_before(text: str, i: int) -> int:
    return max(0, max(text.rfind(c, 0, i) for c in " \t\n\r"))
