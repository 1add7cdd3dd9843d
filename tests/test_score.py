"""`fastdpo score` and `fastdpo rank`: the implicit reward β (log π − log π_ref) of pairs (equal to `fastdpo eval
--per_pair_out`'s), of single responses and of candidates (equal to a naive per-token loop over training's
tokenization), accuracy per subset, length normalisation, and candidates reordered best first."""

import json

import pytest

from conftest import run_cli, tiny_llama, word_tokenizer, write_jsonl
from test_logps import naive_logps

from fastdpo.data import Record
from fastdpo.tokenize import encode_records

PAIRS = [{"prompt": "The sky is", "chosen": " blue .", "rejected": " green", "subset": "colour"},
         {"chosen": "What colour is grass ? green", "rejected": "What colour is grass ? hot hot", "subset": "colour"},
         {"prompt": [{"role": "user", "content": "hello"}], "chosen": [{"role": "assistant", "content": "hello world"}],
          "rejected": [{"role": "assistant", "content": "no"}], "subset": "chat"}]
CANDIDATES = [{"prompt": "The sky is", "candidates": [" blue", " green grass", " cold", " black ."]},
              {"prompt": "hello", "candidates": [" world"]}]
RESPONSES = [{"prompt": "The sky is", "response": " green grass"}]


@pytest.fixture(scope="module")
def models(word_models):
    return word_models


def score(models, command, data, capsys, *flags):
    out = run_cli([command, "--model", str(models / "policy"), "--ref_model", str(models / "reference"), "--data",
                   str(data), "--beta", "0.5", *flags], capsys)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_pair_rewards_equal_evals_and_accuracy_is_counted_per_subset(models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    rows = score(models, "score", data, capsys, "--subset_field", "subset")
    per_pair = tmp_path / "eval.jsonl"
    run_cli(["eval", "--model", str(models / "policy"), "--ref_model", str(models / "reference"), "--data",
             str(data), "--beta", "0.5", "--per_pair_out", str(per_pair)], capsys)
    evals = [json.loads(line) for line in per_pair.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["pair"] * 3
    for row, ev in zip(rows, evals):
        assert row["chosen_reward"] == pytest.approx(ev["chosen_reward"], abs=1e-5)
        assert row["rejected_reward"] == pytest.approx(ev["rejected_reward"], abs=1e-5)
        assert row["correct"] == (row["margin"] > 0)
    summary = json.loads(run_cli(["score", "--model", str(models / "policy"), "--ref_model",
                                  str(models / "reference"), "--data", str(data), "--beta", "0.5",
                                  "--subset_field", "subset", "--json"], capsys).strip().splitlines()[-1])
    colour = [r for r in rows if r["subset"] == "colour"]
    assert summary["subsets"]["colour"]["accuracy"] == sum(r["correct"] for r in colour) / 2
    assert summary["subsets"]["chat"]["pairs"] == 1
    assert summary["mean_margin"] == pytest.approx(sum(r["margin"] for r in rows) / 3)


def naive_reward(policy, reference, prompt, response, tok, beta=0.5):
    """β (log π − log π_ref) of a response tokenized as training tokenizes it (its EOS appended)."""
    p, r, _, _ = encode_records([Record(prompt, response, response, "x")], tok)[0]
    return beta * (naive_logps(policy, p, r) - naive_logps(reference, p, r)), len(r)


def test_candidates_and_responses_get_the_naive_reward_and_rank_sorts_them(models, tmp_path, capsys):
    """Four candidates (two pairs), one alone (paired with itself), one response row: each reward equals the
    naive per-token loop's; rank lists them best first; --length_normalize divides by the tokens."""
    tok = word_tokenizer()
    policy, reference = (tiny_llama(len(tok), seed=s) for s in (1, 2))
    data = write_jsonl(tmp_path / "c.jsonl", CANDIDATES + RESPONSES)
    rows = score(models, "score", data, capsys)
    for row, record in zip(rows[:2], CANDIDATES):
        expected = [naive_reward(policy, reference, record["prompt"], c, tok) for c in record["candidates"]]
        assert row["rewards"] == pytest.approx([e[0] for e in expected], abs=1e-4)
        assert row["tokens"] == [e[1] for e in expected]
    alone = naive_reward(policy, reference, "The sky is", " green grass", tok)[0]
    assert rows[2]["reward"] == pytest.approx(alone, abs=1e-4) == rows[0]["rewards"][1]
    ranked = score(models, "rank", data, capsys)
    assert len(ranked) == 2 and ranked[0]["rewards"] == sorted(rows[0]["rewards"], reverse=True)
    assert ranked[0]["candidates"] == [CANDIDATES[0]["candidates"][k] for k in ranked[0]["order"]]
    normalized = score(models, "score", data, capsys, "--length_normalize")
    assert normalized[0]["rewards"] == pytest.approx([r / n for r, n in zip(rows[0]["rewards"], rows[0]["tokens"])])


@pytest.mark.parametrize("command, records, flags, message", [
    ("score", PAIRS, ["--no-ref"], "--ref_model: the implicit reward"),
    ("rank", PAIRS, [], "--data: rank needs records with a list of candidates (field 'candidates'"),
    ("score", [{"prompt": "hello", "candidates": []}], [], "c.jsonl:1: field 'candidates' must be a non-empty list"),
    ("score", [{"prompt": "hello", "candidates": [" world", "  "]}], [], "c.jsonl:1: field 'candidates[1]' is an empty string"),
    ("score", [{"prompt": "hello", "candidates": [[{"role": "assistant", "content": "hi"}]]}], [],
     "c.jsonl:1: field 'prompt' is text but field 'candidates[0]' is a list of messages"),
    ("score", [{"prompt": [{"role": "user", "content": "hi"}], "response": "yes"}], [],
     "c.jsonl:1: field 'prompt' is a list of messages but field 'response' is text"),
])
def test_bad_input_is_one_line(models, tmp_path, capsys, command, records, flags, message):
    data = write_jsonl(tmp_path / "c.jsonl", records)
    reference = [] if "--no-ref" in flags else ["--ref_model", str(models / "reference")]
    code = 1 if "c.jsonl:" in message else 2
    run_cli([command, "--model", str(models / "policy"), *reference, "--data", str(data)], capsys, expect_code=code)
    assert message in run_cli.last_stderr and "Traceback" not in run_cli.last_stderr
