"""The Python API, for notebooks and scripts: `fastdpo.train(...)`, `fastdpo.evaluate(...)`,
`fastdpo.generate(...)`, `fastdpo.score(...)` and `fastdpo.rank(...)`.

    import fastdpo
    result = fastdpo.train(model="path/to/model", data="pairs.jsonl", eval_data="heldout.jsonl",
                           output_dir="out", beta=0.1, learning_rate=5e-7)
    result.model, result.eval_after

`model` and `ref_model` take a path, a hub id or a loaded transformers model (then pass `tokenizer=` beside it,
unless the model was loaded from a directory that holds one); `data` and `eval_data` take a path or name, a
`datasets.Dataset` or `DatasetDict`, or a list of dicts. Every other keyword is a config option, named as the
command-line flags (docs/options.md). Validation, messages and outputs are the CLI's; bad input raises
`fastdpo.errors.UserError` with the one-line message the CLI prints.
"""

from __future__ import annotations

import os

from fastdpo.config import Config, eval_keys, from_keywords, make_config, options
from fastdpo.errors import UserError
from fastdpo.models import Inputs, in_memory_name


def train(model, data, eval_data=None, *, tokenizer=None, ref_model=None, **options_):
    """Fine-tune `model` on the preference pairs `data` with DPO. Returns a `TrainResult`: `.model` (the trained
    policy, in memory, in eval mode; with `merge_lora=True` the merged model), `.eval_before` / `.eval_after`
    (held-out metrics), `.last_metrics`, `.output_dir`."""
    from fastdpo.training import train as run

    cfg, inputs = _config("fastdpo.train", options(Config), dict(model=model, data=data, eval_data=eval_data,
                                                                ref_model=ref_model), tokenizer, options_)
    return run(cfg, inputs)


def evaluate(model, data, ref_model=None, *, tokenizer=None, **options_):
    """Score `model` against `ref_model` on the preference pairs `data` (as `fastdpo eval`). Returns an
    `EvalResult`: `.metrics` (means over the pairs) and `.rows` (one per pair)."""
    from fastdpo.evaluation import run_eval

    known = {k: options(Config)[k] for k in eval_keys()}
    cfg, inputs = _config("fastdpo.evaluate", known, dict(model=model, data=data, ref_model=ref_model), tokenizer,
                          options_)
    return run_eval(cfg, inputs)


def generate(model, data, ref_model=None, *, tokenizer=None, **options_):
    """Sample from `model` for each prompt of `data` (prompt records or preference data; as `fastdpo
    generate`). Returns a `GenerateResult`: `.rows` (one per sample: its text, token count, whether it ended with
    EOS, log-probs under the policy and, with `ref_model`, the reference, their difference `kl` and the implicit
    reward) and `.summary` (means, the EOS rate, the KL's standard error)."""
    from fastdpo.config import generate_keys
    from fastdpo.generation import run_generate

    known = {k: options(Config)[k] for k in generate_keys()}
    cfg, inputs = _config("fastdpo.generate", known, dict(model=model, data=data, ref_model=ref_model), tokenizer,
                          options_)
    return run_generate(cfg, inputs)


def score(model, data, ref_model, *, tokenizer=None, response_field="response", candidates_field="candidates",
          subset_field=None, length_normalize=False, **options_):
    """The implicit reward β (log π − log π_ref) of every response of `data` (as `fastdpo score`): preference
    pairs, a prompt with one response (`response_field`), or a prompt with candidates (`candidates_field`).
    Returns a `ScoreResult`: `.rows` (one per record) and `.summary` (reward accuracy and mean margin of the
    pairs, per `subset_field` value too)."""
    from fastdpo.config import score_keys
    from fastdpo.scoring import ScoreFields, run_score

    known = {k: options(Config)[k] for k in score_keys()}
    cfg, inputs = _config("fastdpo.score", known, dict(model=model, data=data, ref_model=ref_model), tokenizer,
                          options_)
    return run_score(cfg, ScoreFields(response_field, candidates_field, subset_field), inputs, length_normalize)


def rank(model, data, ref_model, **keywords):
    """Each record's candidates reordered by implicit reward, best first (as `fastdpo rank`; the keywords of
    `score`): a list of rows with the candidates, their rewards and `order`, their positions in the record."""
    from fastdpo.scoring import ranked

    return ranked(score(model, data, ref_model, **keywords))


def _config(caller: str, known: dict, sources: dict, tokenizer, keywords: dict) -> tuple[Config, Inputs]:
    """The resolved config and the objects passed in memory. An object stands in for its option: the config
    records what it was (a model's directory, or a description), and the run uses the object itself."""
    import torch

    values = from_keywords(keywords, known, caller)
    inputs = Inputs(tokenizer=tokenizer)
    for key, value in sources.items():
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        if value is None or isinstance(value, str):
            values[key] = value
        elif key in ("model", "ref_model"):
            if not isinstance(value, torch.nn.Module):
                raise UserError(f"{key}: expected a path, a hub id or a loaded model, got {type(value).__name__}",
                                exit_code=2)
            setattr(inputs, key, value)
            values[key] = in_memory_name(value)
        else:
            setattr(inputs, key, value)
            values[key] = f"<{type(value).__name__} passed in memory>"
    return make_config(values, dict.fromkeys(values, "")), inputs
