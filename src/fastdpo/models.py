"""Load policies, references and tokenizers; the built-in tiny model. Nothing here downloads unless asked to."""

from __future__ import annotations

import json
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
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserError(f"--{flag}: {name}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked, so any id works
    return tokenizer


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
