"""Load the policy, the reference model and the tokenizer (from paths, hub ids, the built-in tiny model, or objects
the Python API was given); LoRA wrapping. Nothing here downloads unless asked to."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fastdpo.data import asset_path
from fastdpo.errors import UserError

BUILTIN_MODELS = {"builtin:tiny": "tiny"}


@dataclass
class Inputs:
    """What the Python API was given in memory instead of the config's paths; None: load it from the config."""

    model: Any = None  # a loaded transformers PreTrainedModel (trained in place)
    tokenizer: Any = None  # its tokenizer
    ref_model: Any = None  # a loaded reference model
    data: Any = None  # a list of dicts, a datasets.Dataset or a datasets.DatasetDict
    eval_data: Any = None


def in_memory_name(model) -> str:
    """What the saved config records for a model passed in memory: where it was loaded from, if anywhere."""
    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return path or f"<{type(model).__name__} passed in memory>"


def _source(name: str, flag: str) -> str:
    if name in BUILTIN_MODELS:
        return asset_path(BUILTIN_MODELS[name])
    if name.startswith("builtin:"):
        raise UserError(f"--{flag}: unknown built-in model {name!r}; built-in: {', '.join(BUILTIN_MODELS)}",
                        exit_code=2)
    looks_local = name.startswith((".", "/", "~")) or os.path.exists(name) or name.count("/") > 1
    if looks_local and not os.path.isdir(name):
        raise UserError(f"--{flag}: {name}: no such model directory")
    if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f))
                                       for f in ("config.json", "adapter_config.json")):
        raise UserError(f"--{flag}: {name}: not a model directory (no config.json or adapter_config.json)")
    return name


def load_tokenizer(name: str, trust_remote_code: bool = False, flag: str = "model"):
    from transformers import AutoTokenizer

    source = _source(name, flag)
    base = adapter_base(source) if os.path.isdir(source) else None
    if base and not any(os.path.isfile(os.path.join(source, f)) for f in ("tokenizer.json", "tokenizer.model")):
        return load_tokenizer(base, trust_remote_code, flag)  # an adapter saved without its tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError ... for a missing tokenizer
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--{flag}: {name}: could not load a tokenizer ({first}); the model directory needs "
                        "its tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json)") from None
    return _with_pad(tokenizer, f"{flag}: {name}")


def policy_tokenizer(cfg, inputs: Inputs):
    """The policy's tokenizer: the one passed beside a model in memory, else loaded from the model's path."""
    if inputs.tokenizer is not None:
        return _with_pad(inputs.tokenizer, "tokenizer")
    if inputs.model is not None:
        path = in_memory_name(inputs.model)
        if path.startswith("<") or not (os.path.isdir(path) or path.count("/") == 1):
            raise UserError("tokenizer: a model passed in memory needs its tokenizer beside it "
                            "(fastdpo.train(model=model, tokenizer=tokenizer, ...))", exit_code=2)
        return load_tokenizer(path, cfg.trust_remote_code)
    return load_tokenizer(cfg.model, cfg.trust_remote_code)


def _with_pad(tokenizer, name: str):
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserError(f"--{name}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked, so any id works
    return tokenizer


def load_policy(cfg, inputs: Inputs):
    """The policy to train, dropout off, with LoRA adapters when the config asks for them."""
    model = inputs.model if inputs.model is not None else load_model(
        cfg.model, cfg.seed, cfg.trust_remote_code, load_in_4bit=cfg.load_in_4bit)
    disable_dropout(model)  # before LoRA wraps it, so --lora_dropout keeps its value
    if cfg.lora:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.adapter)
    return model


@dataclass(frozen=True)
class ReferenceWeights:
    """Where a run's reference log-probs come from; `reference.build_reference` makes the Reference of it."""

    kind: Literal["none", "adapters", "policy", "model"]
    # none: reference-free. adapters: the LoRA policy's own weights with its adapters off (no second model).
    # policy: the starting policy itself, for log-probs precomputed before it trains (no copy).
    # model: `model`, a frozen model (--ref_model, or a copy of the starting policy).
    model: Any = None


def reference_weights(cfg, policy, inputs: Inputs, device) -> ReferenceWeights:
    """The reference the config asks for, loaded (or copied) onto `device` and frozen, with dropout off."""
    if cfg.reference == "none":
        return ReferenceWeights("none")
    if inputs.ref_model is not None or cfg.ref_model:
        model = inputs.ref_model if inputs.ref_model is not None else load_model(
            cfg.ref_model, cfg.seed, cfg.trust_remote_code, flag="ref_model")
    elif is_lora(policy):
        return ReferenceWeights("adapters")
    elif cfg.reference == "precomputed":
        return ReferenceWeights("policy", policy)
    else:
        model = copy.deepcopy(policy)  # before anything has trained the policy
    disable_dropout(model)
    return ReferenceWeights("model", model.eval().requires_grad_(False).to(device))


def disable_dropout(model) -> None:
    """DPO compares log-probs of the policy and the reference: dropout noise would bias both (TRL does the same)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def adapter_base(path: str) -> str | None:
    """The base model a peft LoRA adapter directory was trained on, or None if `path` is not an adapter."""
    config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        return json.load(f).get("base_model_name_or_path")


def load_model(name: str, seed: int = 42, trust_remote_code: bool = False, flag: str = "model",
               load_in_4bit: bool = False):
    """A causal LM in float32 and eval mode (dropout off); mixed precision is applied by autocast.

    An adapter directory loads its base with the adapter merged in (for scoring: `eval`, `--ref_model`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if os.path.isdir(name) and adapter_base(name):
        return _load_adapter_merged(name, seed, trust_remote_code, flag)
    source = _source(name, flag)
    try:
        if name in BUILTIN_MODELS:
            config = AutoConfig.from_pretrained(source)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the built-in model is its config plus a seeded initialisation
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.name_or_path = name  # recorded by peft as an adapter's base
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                         trust_remote_code=trust_remote_code,
                                                         **_quantization(load_in_4bit, flag))
    except UserError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--{flag}: {name}: could not load the model ({first})") from None
    model.eval()
    return model


def _quantization(load_in_4bit: bool, flag: str) -> dict:
    """QLoRA: the base in 4-bit NF4 through bitsandbytes, which needs a CUDA GPU."""
    if not load_in_4bit:
        return {}
    if not torch.cuda.is_available():
        raise UserError("--load_in_4bit: 4-bit bases (QLoRA) need a CUDA GPU with bitsandbytes; this machine has "
                        "no GPU. Train LoRA on the full-precision base instead (drop --load_in_4bit)", exit_code=2)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--load_in_4bit needs bitsandbytes: pip install bitsandbytes", exit_code=2) from None
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16,
                                                      bnb_4bit_use_double_quant=True)}


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA needs peft: pip install 'fastdpo[lora]'", exit_code=2) from None
    return peft


def _load_adapter_merged(path: str, seed: int, trust_remote_code: bool, flag: str):
    base = load_model(adapter_base(path), seed, trust_remote_code, flag)
    try:
        model = _peft().PeftModel.from_pretrained(base, path)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--{flag}: {path}: could not load the adapter ({first})") from None
    return model.merge_and_unload().eval()


def apply_lora(model, r: int, alpha: float, dropout: float, targets: str, adapter: str | None):
    """Wrap `model` with trainable LoRA adapters (a new one, or `adapter` plus a frozen copy of it named "ref").

    Only the adapters train; the reference is the same weights with the adapters off (or the "ref" adapter), so
    no second copy of the model is held."""
    peft = _peft()
    if adapter:
        try:
            model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
            model.load_adapter(adapter, adapter_name="ref", is_trainable=False)
        except Exception as e:  # peft raises ValueError, OSError, KeyError ... for a bad adapter directory
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"--adapter: {adapter}: could not load the LoRA adapter ({first})") from None
        model.set_adapter("default")
        _set_lora_dropout(model, {"default": dropout, "ref": 0.0})  # the reference is never noisy
        return model
    target_modules = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                             task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"--lora_targets: {e}", exit_code=2) from None


def _set_lora_dropout(model, rates: dict[str, float]) -> None:
    for module in model.modules():
        layers = getattr(module, "lora_dropout", None)
        if isinstance(layers, torch.nn.ModuleDict):
            for name, rate in rates.items():
                if name in layers:
                    layers[name] = torch.nn.Dropout(rate) if rate > 0 else torch.nn.Identity()


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")
