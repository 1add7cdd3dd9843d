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
    check_tokenizer(tokenizer, f"--{flag}: {name}")
    return _with_pad(tokenizer, f"{flag}: {name}")


PROBE = "The quick brown fox jumps over the lazy dog. It was 1984."


def check_tokenizer(tokenizer, where: str) -> None:
    """Refuse a tokenizer that cannot do the job: empty (transformers builds one for several model families when
    the tokenizer files are missing), turning ordinary text into unknown tokens only, or without an EOS token
    (every response ends with it)."""
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    unknown = tokenizer.unk_token_id
    if len(tokenizer) < 4 or not ids or all(i == unknown for i in ids):
        shown = "nothing" if not ids else "unknown tokens only"
        raise UserError(f"{where}: its tokenizer is empty ({len(tokenizer)} tokens; ordinary text becomes {shown}): "
                        "the directory lacks its tokenizer files (tokenizer.json or tokenizer.model and "
                        "tokenizer_config.json); copy them from the model it was trained from")
    if tokenizer.eos_token_id is None:
        raise UserError(f"{where}: its tokenizer has no EOS token, which ends every response; set eos_token in its "
                        "tokenizer_config.json")


def model_config(name, trust_remote_code: bool = False, flag: str = "model"):
    """The transformers config of a model (a loaded one, a path, a hub id, an adapter's base or builtin:tiny),
    without loading its weights."""
    from transformers import AutoConfig

    if not isinstance(name, str):
        return name.config
    source = _source(name, flag)
    if os.path.isdir(source) and adapter_base(source):
        return model_config(adapter_base(source), trust_remote_code, flag)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError ... for a bad config
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--{flag}: {name}: could not load the model's config ({first})") from None


def position_limit(config) -> int | None:
    """The longest sequence a model's positions cover (its position table, or the context it was trained for)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocabulary_size(config) -> int | None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def check_models(cfg, inputs: Inputs, tokenizer, log) -> "object":
    """The checks before the heavy work, from the models' configs and tokenizers: each model's vocabulary holds
    the tokenizer's ids; a reference's tokenizer is the policy's; `max_length` fits the models' positions (capped
    with a notice, and `max_prompt_length` with it). Returns the config with the lengths it can use."""
    import dataclasses

    configs = {"model": model_config(inputs.model if inputs.model is not None else cfg.model,
                                     cfg.trust_remote_code)}
    if inputs.ref_model is not None or cfg.ref_model:
        configs["ref_model"] = model_config(inputs.ref_model if inputs.ref_model is not None else cfg.ref_model,
                                            cfg.trust_remote_code, "ref_model")
        if cfg.ref_model and inputs.ref_model is None:
            check_same_tokenizer(cfg.ref_model, tokenizer, cfg.trust_remote_code)
    for flag, config in configs.items():
        rows = vocabulary_size(config)
        if rows is not None and len(tokenizer) > rows:
            raise UserError(f"--{flag}: the model's vocabulary has {rows} rows but the tokenizer has {len(tokenizer)} "
                            "tokens: they do not belong together (the ids past its vocabulary would crash it)")
    limits = {flag: position_limit(c) for flag, c in configs.items() if position_limit(c)}
    if not limits or min(limits.values()) >= cfg.max_length:
        return cfg
    flag, limit = min(limits.items(), key=lambda kv: kv[1])
    prompt = min(cfg.max_prompt_length, limit // 2)
    log(f"fastdpo: --max_length {cfg.max_length} is longer than the {limit} positions of --{flag}; using --max_length "
        f"{limit}" + (f" and --max_prompt_length {prompt}" if prompt != cfg.max_prompt_length else ""))
    return dataclasses.replace(cfg, max_length=limit, max_prompt_length=prompt)


def check_same_tokenizer(ref_model: str, tokenizer, trust_remote_code: bool) -> None:
    """A reference directory with a tokenizer of its own must tokenize as the policy's does."""
    source = _source(ref_model, "ref_model")
    if not os.path.isdir(source) or not any(os.path.isfile(os.path.join(source, f))
                                            for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return  # none of its own: the vocabulary check guards the ids
    theirs = load_tokenizer(ref_model, trust_remote_code, "ref_model")
    if theirs.get_vocab() != tokenizer.get_vocab() or (theirs.eos_token_id, theirs.bos_token_id) != (
            tokenizer.eos_token_id, tokenizer.bos_token_id):
        raise UserError(f"--ref_model: {ref_model}: its tokenizer differs from the policy's (another vocabulary or "
                        "other special tokens): the reference must score the same token ids; use a reference "
                        "trained from the same base")


def policy_tokenizer(cfg, inputs: Inputs):
    """The policy's tokenizer: the one passed beside a model in memory, else loaded from the model's path."""
    if inputs.tokenizer is not None:
        check_tokenizer(inputs.tokenizer, "tokenizer")
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(model, trust_remote_code: bool = False, flag: str = "model") -> torch.dtype:
    """The dtype a model's weights were saved in (`model`: a loaded model, or its path / hub id / builtin name):
    a loaded model's own, else its config's `dtype`, float32 where the config names none."""
    if not isinstance(model, str):
        return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config = model_config(model, trust_remote_code, flag)
    value = getattr(config, "dtype", None)  # transformers reads an older config's torch_dtype into it
    value = getattr(torch, value, None) if isinstance(value, str) else value
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def weights_dtype(cfg, model, flag: str = "model") -> torch.dtype:
    """The dtype `model` (as `checkpoint_dtype` takes it) is loaded in: --torch_dtype, or its own."""
    if cfg.torch_dtype != "auto":
        return DTYPES[cfg.torch_dtype]
    return checkpoint_dtype(model, cfg.trust_remote_code, flag)


def attention_implementation(cfg, device) -> str:
    """--attn_implementation, with `auto` resolved for `device`. On CUDA: flash-attention's varlen kernels where
    the layout needs no 4-D mask (packing without prefix sharing) and flash-attn is installed, else FlexAttention
    (which has a backward there); each for models that support it (`set_attention`). SDPA elsewhere."""
    from fastdpo.attention import flex_available

    if cfg.attn_implementation == "flex_attention" and not flex_available():
        raise UserError(f"--attn_implementation flex_attention: needs torch >= 2.6 (this is torch {torch.__version__}); "
                        "use sdpa", exit_code=2)
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if torch.device(device).type != "cuda":
        return "sdpa"
    from transformers.utils import is_flash_attn_2_available

    if cfg.packing and not cfg.prefix_sharing and is_flash_attn_2_available():
        return "flash_attention_2"
    return "flex_attention" if flex_available() else "sdpa"


def set_attention(models, implementation: str, asked: bool) -> str:
    """Every model (a Hugging Face model, or None) computes attention with `implementation` from its next forward
    on (transformers dispatches each layer's attention by the config's name). Where it was not `asked` for (auto),
    a model that does not support it gets SDPA, or keeps its own. Returns the policy's (the first model's)
    implementation as it now is."""
    for model in models:
        if model is None:
            continue
        wanted = implementation
        if not asked:
            supports = {"flex_attention": "_supports_flex_attn", "sdpa": "_supports_sdpa",
                        "flash_attention_2": "_supports_flash_attn"}
            for name in (implementation, "sdpa"):
                if getattr(model, supports.get(name, ""), False):
                    wanted = name
                    break
            else:
                wanted = model.config._attn_implementation
        if getattr(model.config, "_attn_implementation", None) == wanted:
            continue
        try:
            model.set_attn_implementation(wanted)
        except (ImportError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"--attn_implementation {wanted}: not available for this model here ({first})",
                            exit_code=2) from None
    return next(m for m in models if m is not None).config._attn_implementation


def policy_and_reference(cfg, inputs: Inputs, device):
    """For scoring and sampling: the policy and, with --ref_model, the reference (else None), in eval mode on the
    device; a model passed in memory is used as it is (cast to --torch_dtype)."""
    def load(obj, name, flag):
        if obj is not None:
            return in_torch_dtype(cfg, obj)
        return load_model(name, cfg.seed, cfg.trust_remote_code, flag=flag, dtype=weights_dtype(cfg, name, flag))

    policy = load(inputs.model, cfg.model, "model").eval().to(device)
    has_reference = inputs.ref_model is not None or cfg.ref_model
    reference = load(inputs.ref_model, cfg.ref_model, "ref_model").eval().to(device) if has_reference else None
    return policy, reference


def in_torch_dtype(cfg, model):
    """A model passed in memory, cast to --torch_dtype (as it is with `auto`)."""
    return model if cfg.torch_dtype == "auto" else model.to(DTYPES[cfg.torch_dtype])


def training_dtype(cfg, model, strategy: str, log) -> torch.dtype:
    """The dtype the policy trains in: `weights_dtype`, but never float16 (AdamW's epsilon rounds to 0 there, and a
    weight without gradient becomes NaN), and float32 under DeepSpeed (its bf16 master-weight mode is not wired in
    yet). A bf16 policy is said: its updates smaller than a bf16 step are lost."""
    dtype, asked = weights_dtype(cfg, model), cfg.torch_dtype != "auto"
    if asked and dtype == torch.float16:
        raise UserError("--torch_dtype float16: AdamW cannot train float16 weights (its epsilon rounds to 0 and "
                        "weights without a gradient become NaN); use bfloat16 or float32", exit_code=2)
    if strategy == "deepspeed" and dtype != torch.float32:
        if asked:
            raise UserError(f"--torch_dtype {cfg.torch_dtype}: under DeepSpeed fastdpo trains float32 weights (with "
                            "--precision bf16 for bf16 compute); pass --torch_dtype float32", exit_code=2)
        log(f"fastdpo: the checkpoint's weights are {str(dtype).removeprefix('torch.')}; under DeepSpeed the policy "
            "trains in float32 (saved in the checkpoint's dtype)")
        return torch.float32
    if dtype == torch.float16:
        log("fastdpo: the checkpoint's weights are float16, which AdamW cannot train: the policy trains in float32 "
            "(saved as float16; --torch_dtype bfloat16 halves the memory)")
        return torch.float32
    if dtype == torch.bfloat16:
        log("fastdpo: the policy trains in bfloat16 weights" + ("" if asked else " (the checkpoint's dtype)") +
            ": an update smaller than a bf16 step of its weight is lost; --torch_dtype float32 keeps float32 "
            "weights")
    return dtype


def save_dtype(cfg, inputs: Inputs) -> torch.dtype:
    """The dtype the trained policy is saved in: --save_dtype, or the checkpoint's."""
    if cfg.save_dtype != "auto":
        return DTYPES[cfg.save_dtype]
    return checkpoint_dtype(inputs.model if inputs.model is not None else cfg.model, cfg.trust_remote_code)


def load_policy(cfg, inputs: Inputs, *, log, meta: bool = False, strategy: str = "single"):
    """The policy to train in its `training_dtype`, dropout off, with LoRA adapters when the config asks.
    `meta`: its structure only (`load_model`)."""
    if inputs.model is not None:
        dtype = training_dtype(cfg, inputs.model, strategy, log)
        model = inputs.model if checkpoint_dtype(inputs.model) == dtype else inputs.model.to(dtype)
    else:
        model = load_model(cfg.model, cfg.seed, cfg.trust_remote_code, load_in_4bit=cfg.load_in_4bit,
                           dtype=training_dtype(cfg, cfg.model, strategy, log), meta=meta)
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


def reference_weights(cfg, policy, inputs: Inputs, device, meta: bool = False) -> ReferenceWeights:
    """The reference the config asks for, loaded (or copied) onto `device` (None: where it is) and frozen, with
    dropout off. `meta`: a --ref_model's structure only (`load_model`)."""
    if cfg.reference == "none":
        return ReferenceWeights("none")
    if inputs.ref_model is not None or cfg.ref_model:
        if inputs.ref_model is not None:
            model = in_torch_dtype(cfg, inputs.ref_model)
        else:
            model = load_model(cfg.ref_model, cfg.seed, cfg.trust_remote_code, flag="ref_model",
                               dtype=weights_dtype(cfg, cfg.ref_model, "ref_model"), meta=meta)
    elif is_lora(policy):
        return ReferenceWeights("adapters")
    elif cfg.reference == "precomputed":
        return ReferenceWeights("policy", policy)
    else:
        model = copy.deepcopy(policy)  # before anything has trained the policy
    disable_dropout(model)
    model = model.eval().requires_grad_(False)
    return ReferenceWeights("model", model if device is None else model.to(device))


def hold_matmul_weights_in(model, dtype: torch.dtype) -> float:
    """A frozen model's matmul weights (its linear layers', GPT-2's Conv1D) held in the autocast dtype, the
    embeddings and norms as they are: autocast casts the float32 weights of those layers to `dtype` at every
    forward, so under autocast the model computes exactly what it computed before, holding about half the bytes
    (a tied lm_head stays with its embedding). It then runs under autocast only. Returns the share of its weights
    now held in `dtype`."""
    from transformers.pytorch_utils import Conv1D

    embedding = model.get_input_embeddings()
    tied = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and id(module.weight) not in tied \
                and module.weight.dtype == torch.float32:
            module.to(dtype)
    weights = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in weights if p.dtype == dtype) / max(sum(p.numel() for p in weights), 1)


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
               load_in_4bit: bool = False, dtype: torch.dtype = torch.float32, meta: bool = False):
    """A causal LM with `dtype` weights, in eval mode (dropout off); mixed precision is applied by autocast.
    `meta`: its structure only, on the meta device, for a process that receives its weights from another.

    An adapter directory loads its base with the adapter merged in (for scoring: `eval`, `--ref_model`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if os.path.isdir(name) and adapter_base(name):  # merged, it has its base's structure
        if meta:
            return load_model(adapter_base(name), seed, trust_remote_code, flag, dtype=dtype, meta=True)
        return _load_adapter_merged(name, seed, trust_remote_code, flag, dtype)
    source = _source(name, flag)
    try:
        if meta:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(model_config(name, trust_remote_code, flag), dtype=dtype,
                                                         trust_remote_code=trust_remote_code)
        elif name in BUILTIN_MODELS:
            config = AutoConfig.from_pretrained(source)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the built-in model is its config plus a seeded initialisation
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            model.name_or_path = name  # recorded by peft as an adapter's base
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                         trust_remote_code=trust_remote_code,
                                                         **_quantization(load_in_4bit, flag))
            if os.path.isdir(source):  # recorded as an adapter's base: a path that works from any directory
                model.name_or_path = model.config._name_or_path = os.path.abspath(source)
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


def _load_adapter_merged(path: str, seed: int, trust_remote_code: bool, flag: str, dtype: torch.dtype):
    base = load_model(adapter_base(path), seed, trust_remote_code, flag, dtype=dtype)
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
