"""Load policies, references and tokenizers; the built-in tiny model. Nothing here downloads unless asked to."""

from __future__ import annotations

import os
from importlib import resources

import torch

from fastdpo.errors import UserError

BUILTIN_MODELS = {"builtin:tiny": "tiny"}
BUILTIN_DATA = {"builtin:example": "example/train.jsonl", "builtin:example-eval": "example/eval.jsonl"}


def asset_path(relative: str) -> str:
    return str(resources.files("fastdpo").joinpath("assets", relative))


def resolve_data(path: str) -> str:
    """`builtin:example` and `builtin:example-eval` name the preference set the package ships."""
    if path in BUILTIN_DATA:
        return asset_path(BUILTIN_DATA[path])
    if path.startswith("builtin:"):
        raise UserError(f"--data: unknown built-in data set {path!r}; built-in: {', '.join(BUILTIN_DATA)}",
                        exit_code=2)
    return path


def _source(name: str, flag: str) -> str:
    if name in BUILTIN_MODELS:
        return asset_path(BUILTIN_MODELS[name])
    if name.startswith("builtin:"):
        raise UserError(f"--{flag}: unknown built-in model {name!r}; built-in: {', '.join(BUILTIN_MODELS)}",
                        exit_code=2)
    looks_local = name.startswith((".", "/", "~")) or os.path.exists(name) or name.count("/") > 1
    if looks_local and not os.path.isdir(name):
        raise UserError(f"--{flag}: {name}: no such model directory")
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise UserError(f"--{flag}: {name}: not a model directory (no config.json)")
    return name


def load_tokenizer(name: str, trust_remote_code: bool = False, flag: str = "model"):
    from transformers import AutoTokenizer

    source = _source(name, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError ... for a missing tokenizer
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--{flag}: {name}: could not load a tokenizer ({first}); the model directory needs "
                        "its tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json)") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserError(f"--{flag}: {name}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked, so any id works
    return tokenizer


def load_model(name: str, seed: int = 42, trust_remote_code: bool = False, flag: str = "model"):
    """A causal LM in float32 and eval mode (dropout off); mixed precision is applied by autocast."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = _source(name, flag)
    try:
        if name in BUILTIN_MODELS:
            config = AutoConfig.from_pretrained(source)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the built-in model is its config plus a seeded initialisation
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                         trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--{flag}: {name}: could not load the model ({first})") from None
    model.eval()
    return model
