"""Loading preference records: every file format, the record forms, implicit prompts and bad records."""

import json

import pytest

from fastdpo.data import Fields, load_records, split_implicit_prompt
from fastdpo.errors import UserError

from conftest import write_jsonl

ROWS = [{"prompt": "The sky is", "chosen": " blue", "rejected": " green"},
        {"prompt": "It is", "chosen": " hot", "rejected": " cold"}]


def test_jsonl_json_parquet_and_save_to_disk_give_the_same_records(tmp_path):
    datasets = pytest.importorskip("datasets")
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dir"))
    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]
    for path in (jsonl, tmp_path / "d.json", tmp_path / "d.parquet", tmp_path / "dir"):
        got = [(r.prompt, r.chosen, r.rejected) for r in load_records(str(path)).records]
        assert got == expected, path
    assert len(load_records(str(tmp_path / "dir"), split="test").records) == 1
    with pytest.raises(UserError, match="no split 'dev'"):
        load_records(str(tmp_path / "dir"), split="dev")


def test_custom_field_names(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "The sky is", "good": " blue", "bad": " green"}])
    record = load_records(path, fields=Fields("q", "good", "bad")).records[0]
    assert (record.prompt, record.chosen, record.rejected) == ("The sky is", " blue", " green")


def test_implicit_text_prompt_is_cut_back_to_whitespace():
    assert split_implicit_prompt("The sky is blue", "The sky is black") == ("The sky is", " blue", " black")
    assert split_implicit_prompt("The sky", "The skyline") == ("The", " sky", " skyline")
    # a response that is a prefix of the other still keeps at least one word
    assert split_implicit_prompt("Hi there", "Hi there friend") == ("Hi", " there", " there friend")


def test_implicit_chat_prompt_is_the_shared_leading_messages(tmp_path):
    user = {"role": "user", "content": "What colour is the sky ?"}
    row = {"chosen": [user, {"role": "assistant", "content": "blue"}],
           "rejected": [user, {"role": "assistant", "content": "green"}]}
    record = load_records(write_jsonl(tmp_path / "d.jsonl", [row])).records[0]
    assert record.prompt == [user]
    assert record.chosen == [{"role": "assistant", "content": "blue"}]
    assert record.rejected == [{"role": "assistant", "content": "green"}]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "chosen": " b", "rejected": ', "invalid JSON"),
    ('{"prompt": "a", "rejected": " c"}', "missing field 'chosen'"),
    ('{"prompt": "a", "chosen": 3, "rejected": " c"}', "field 'chosen' must be text or a list of messages"),
    ('{"prompt": "a", "chosen": " ", "rejected": " c"}', "field 'chosen' is an empty string"),
    ('{"prompt": 5, "chosen": " b", "rejected": " c"}', "field 'prompt' must be text"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "a", "chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "x"}]}',
     "field 'chosen', message 0"),
])
def test_bad_record_names_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], line])
    with pytest.raises(UserError) as err:
        load_records(path)
    text = str(err.value)
    assert f"{path}:2: " in text and message in text and "\n" not in text


def test_non_utf8_bytes_are_a_bad_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: bytes that are not UTF-8"):
        load_records(str(path))


def test_skip_bad_records_counts_them(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], "{not json", {"prompt": "x"}, ROWS[1]])
    result = load_records(path, on_bad_record="skip")
    assert len(result.records) == 2 and result.skipped == 2


def test_empty_file_and_missing_file_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="no preference records"):
        load_records(str(tmp_path / "empty.jsonl"))
    with pytest.raises(UserError, match="no such file"):
        load_records(str(tmp_path / "missing.jsonl"))
