"""The one typed config: every field is a YAML key, a `--flag` and a keyword of the Python API.

`Config(...)` validates without changing any value (and without importing torch); `resolve()` returns the copy
with the derived values filled in (the reference kind, gradient checkpointing), which is what a run uses and
saves. One parser serves every command: `options()` describes the fields of any options dataclass, and
`parse_flags` / `load_yaml` / `from_keywords` turn flags, YAML and keywords into typed values, each error naming
the key and where it was written.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from fastdpo.errors import UserError
from fastdpo.losses import LOSSES, PARAMETERS, REFERENCE_FREE, users_of


TRACKERS = ("none", "tensorboard", "wandb", "mlflow")


def opt(default, help: str, eval: bool = False, generate: bool = False):
    """An option field: its default, its one-line help, whether `fastdpo eval` takes it too, and whether it is a
    sampling option (`fastdpo generate`'s own, beside the eval keys)."""
    return field(default=default, metadata={"help": help, "eval": eval, "generate": generate})


@dataclass
class Config:
    # --- models -------------------------------------------------------------------------------------------------
    model: Optional[str] = opt(None, "policy to train: a local model directory, a hub id, or builtin:tiny (a tiny "
                                    "random Llama built from the package's config)", eval=True)
    ref_model: Optional[str] = opt(None, "reference model directory or hub id (implies --reference model)",
                                  eval=True)
    reference: Literal["auto", "copy", "model", "precomputed", "none"] = opt(
        "auto", "copy: frozen in-memory copy of the starting policy; model: --ref_model; precomputed: log-probs "
                "computed once, cached, model freed; none: reference-free; auto: model with --ref_model, none for "
                "the reference-free losses, else copy")
    ref_cache_dir: str = opt("", "cache of precomputed reference log-probs ('': $XDG_CACHE_HOME/fastdpo/reference "
                                "or ~/.cache/fastdpo/reference; off: no cache)")
    data_cache_dir: str = opt("", "cache of tokenized data, reused by later runs and --resume ('': "
                                 "$XDG_CACHE_HOME/fastdpo/data or ~/.cache/fastdpo/data; off: no cache)", eval=True)
    trust_remote_code: bool = opt(False, "allow model code from the model directory / hub (off: safe default)",
                                 eval=True)
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "dtype of the policy's and reference's weights as loaded and trained; auto: the checkpoint's (its "
                "config's dtype, float32 where it names none). A copy reference shares the policy's", eval=True)
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = opt(
        "auto", "the models' attention; sdpa attends one segment at a time where segments average 128+ tokens; "
                "flex_attention takes the layouts' mask as a BlockMask that skips the empty blocks (CUDA; on CPU "
                "torch has no flex backward, so there it serves eval only); flash_attention_2 takes no 4-D mask: "
                "packing without prefix sharing, by segment lengths; auto: on CUDA flash_attention_2 with "
                "--prefix_sharing false where flash-attn is installed, else flex_attention, else sdpa", eval=True)
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "dtype of the saved model's weights; auto: the checkpoint's (the loaded model's, for a model passed "
                "in memory). Mid-run checkpoints keep the training dtype, for an exact resume")
    # --- data ---------------------------------------------------------------------------------------------------
    data: Optional[str] = opt(None, ".jsonl, .json, .parquet, a save_to_disk directory, a hub data set or "
                                   "builtin:example", eval=True)
    data_split: str = opt("train", "split to read from a data set directory or hub data set", eval=True)
    eval_data: Optional[str] = opt(None, "held-out preference data, evaluated before training, every eval_steps and "
                                        "at the end (none: no evaluation)")
    eval_data_split: str = opt("test", "split of eval_data to read")
    prompt_field: str = opt("prompt", "record field holding the prompt (absent: implicit prompt)", eval=True)
    chosen_field: str = opt("chosen", "record field holding the chosen (preferred) response", eval=True)
    rejected_field: str = opt("rejected", "record field holding the rejected response", eval=True)
    on_bad_record: Literal["error", "skip"] = opt("error", "error: stop at the first bad record; skip: skip bad "
                                                          "records and count them", eval=True)
    max_length: int = opt(1024, "tokens of prompt + response; responses keep their start, and a pair whose prompt "
                                "leaves no room is dropped", eval=True)
    max_prompt_length: int = opt(512, "tokens of prompt; the prompt keeps its end (and its BOS)", eval=True)
    # --- loss ---------------------------------------------------------------------------------------------------
    loss: str = opt("sigmoid", "loss variant: " + ", ".join(LOSSES), eval=True)
    beta: float = opt(0.1, "KL strength β (inverse temperature of the implicit reward)", eval=True)
    label_smoothing: float = opt(0.0, "label-flip rate ε in [0, 0.5): cDPO for sigmoid; robust, exo_pair, aot, "
                                     "aot_unpaired", eval=True)
    simpo_gamma: float = opt(0.5, "SimPO target reward margin γ", eval=True)
    discopop_tau: float = opt(0.05, "DiscoPOP temperature τ (> 0)", eval=True)
    rpo_alpha: float = opt(0.0, "weight of the chosen response's mean token NLL added to any loss (RPO)", eval=True)
    # --- optimisation -------------------------------------------------------------------------------------------
    learning_rate: float = opt(1e-6, "AdamW peak learning rate")
    lr_scheduler: Literal["constant", "linear", "cosine"] = opt("linear", "constant, linear or cosine decay to 0 "
                                                                         "after warm-up")
    warmup_steps: int = opt(0, "optimizer steps of linear warm-up from 0")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay")
    adam_beta1: float = opt(0.9, "AdamW β1")
    adam_beta2: float = opt(0.999, "AdamW β2")
    adam_epsilon: float = opt(1e-8, "AdamW ε")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0: no clipping); the norm before "
                                   "clipping is logged")
    batch_size: int = opt(8, "preference pairs per optimizer step, over all processes (eval: pairs per forward "
                            "pass)", eval=True)
    micro_batch_size: int = opt(0, "pairs per forward pass per process (0: the whole per-process batch); gradient "
                                   "accumulation follows from the two")
    eval_batch_size: int = opt(0, "pairs per forward pass in evaluation (0: micro_batch_size)")
    max_steps: int = opt(0, "optimizer steps (0: from epochs)")
    epochs: float = opt(1.0, "passes over the training pairs when max_steps is 0")
    shuffle: bool = opt(True, "shuffle the pairs each epoch (seeded, so a resumed run sees the same order)")
    seed: int = opt(42, "seed of the data order and of the built-in model's initialisation", eval=True)
    precision: Literal["fp32", "bf16", "fp16"] = opt("fp32", "fp32, bf16 or fp16: mixed precision via autocast, "
                                                            "log-softmax in fp32 (fp16: CUDA only); the weights' dtype is --torch_dtype",
                                                    eval=True)
    strategy: Literal["auto", "ddp", "fsdp", "hsdp", "zero2", "zero3"] = opt(
        "auto", "how several processes share the work: ddp (every process holds the whole model), fsdp (FSDP2: "
                "weights, gradients and optimizer state sharded), hsdp (FSDP2 sharded within each machine, "
                "replicated across machines), zero2 (DeepSpeed ZeRO-2: gradients and optimizer "
                "state sharded) or zero3 (ZeRO-3: the weights too); auto: what the accelerate config launched, else "
                "ddp. One process ignores it")
    # --- outputs ------------------------------------------------------------------------------------------------
    output_dir: str = opt("fastdpo-output", "where the model, config, metrics and checkpoints go")
    overwrite: bool = opt(False, "allow a non-empty output_dir (its old contents go once data and models have "
                                "loaded; ignored with --resume)")
    resume: bool = opt(False, "continue from the latest checkpoint in output_dir (the same data, batch_size and "
                             "steps)")
    save_steps: int = opt(0, "write a checkpoint every N optimizer steps (0: never mid-run)")
    save_total_limit: int = opt(2, "keep at most this many checkpoints (0: keep all)")
    eval_steps: int = opt(0, "evaluate on eval_data every N steps (0: only before and after training)")
    logging_steps: int = opt(10, "write a metrics.jsonl line every N optimizer steps")
    progress: bool = opt(True, "show a progress bar on stderr where it is a terminal (else, and with false, a log line "
                               "every logging_steps)")
    report_to: str = opt("none", "trackers that get the metrics too: none, or a comma list of tensorboard (in "
                                 "OUTPUT_DIR/tensorboard), wandb (WANDB_MODE=offline works offline), mlflow")
    max_bad_steps: int = opt(10, "stop after this many steps in a row with a non-finite loss or gradients (each "
                                 "is skipped and counted in skipped_steps)")
    # --- LoRA and the reference ------------------------------------------------------------------------------
    lora_r: int = opt(0, "LoRA rank (0: full fine-tuning); the reference is then the base with adapters off")
    lora_alpha: float = opt(16.0, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input, in [0, 1) (0: exact reference log-probs in "
                                  "training)")
    lora_targets: str = opt("all-linear", "modules to adapt: all-linear (every linear layer of the blocks, not the "
                                         "lm_head) or comma-separated names such as q_proj,v_proj")
    adapter: Optional[str] = opt(None, "start from this LoRA adapter directory; a frozen copy of it is the "
                                      "reference")
    merge_lora: bool = opt(False, "also write the merged full model to OUTPUT_DIR/merged")
    load_in_4bit: bool = opt(False, "QLoRA: load the base in 4-bit NF4 through bitsandbytes (CUDA only)")
    ref_sync_steps: int = opt(0, "TR-DPO: every N steps, ref <- alpha * policy + (1 - alpha) * ref (0: never; not "
                                 "with a precomputed reference or LoRA)")
    ref_sync_alpha: float = opt(0.6, "TR-DPO mixing weight alpha in (0, 1]")
    # --- speed and memory (each is exact: the same log-probs as the plain path) --------------------------------
    prefix_sharing: bool = opt(True, "one [prompt|chosen|rejected] sequence per pair: the prompt computed once",
                              eval=True)
    packing: bool = opt(True, "pack several pairs into one row (block-diagonal attention), no padding", eval=True)
    pack_length: int = opt(0, "tokens per packed row (0: the longest pair of the micro-batch)", eval=True)
    group_by_length: bool = opt(False, "batch pairs of similar length together (less padding when not packing)")
    logits_chunk_size: int = opt(256, "response positions per lm_head chunk (0: the model's full logits)",
                                eval=True)
    gradient_checkpointing: Literal["true", "false", "auto"] = opt(
        "auto", "recompute activations in backward: less memory, more time (true or a bare "
                "--gradient_checkpointing, false; auto: on with LoRA, off for full fine-tuning)")

    # --- generation: fastdpo generate, and samples during training -------------------------------------------------
    num_samples: int = opt(1, "samples per prompt", generate=True)
    temperature: float = opt(1.0, "sampling temperature: 1 samples from the policy itself (what the per-sample KL "
                                  "estimate assumes); 0: greedy", generate=True)
    top_p: float = opt(1.0, "nucleus sampling: sample from the likeliest tokens holding this much probability "
                            "(1: off)", generate=True)
    top_k: int = opt(0, "sample from the k likeliest tokens (0: off; transformers' generate defaults to 50)",
                     generate=True)
    max_new_tokens: int = opt(128, "tokens a sample holds at most; a sample cut there ends without EOS",
                              generate=True)
    eval_samples: int = opt(0, "train: at every evaluation, sample the first N distinct eval prompts (with the "
                               "sampling options) and log the samples' mean KL, implicit reward, length and EOS rate; "
                               "each sample goes to OUTPUT_DIR/samples.jsonl")

    def __post_init__(self):
        self.validate()

    # --- derived values (what resolve() fills in) ----------------------------------------------------------------

    @property
    def lora(self) -> bool:
        return bool(self.lora_r > 0 or self.adapter)

    def reference_kind(self) -> str:
        """The reference this config asks for: `reference`, with `auto` resolved."""
        if self.reference != "auto":
            return self.reference
        if self.ref_model:
            return "model"
        return "none" if self.loss in REFERENCE_FREE else "copy"

    def resolve(self) -> "Config":
        """This config with its derived values filled in; a run uses and saves this one."""
        checkpointing = self.gradient_checkpointing
        if checkpointing == "auto":  # a LoRA run is chosen to save memory (TRL and torchtune checkpoint by default)
            checkpointing = "true" if self.lora else "false"
        return dataclasses.replace(self, reference=self.reference_kind(), gradient_checkpointing=checkpointing,
                                   overwrite=self.overwrite and not self.resume)

    def loss_params(self) -> dict[str, float]:
        """The chosen loss's parameters from this config, as keywords for `losses.preference_loss`."""
        return {name: getattr(self, name) for name in LOSSES[self.loss].params} | {"rpo_alpha": self.rpo_alpha}

    # --- validation: checks only, every message names the key -------------------------------------------------

    def validate(self) -> None:
        for name, option in options(Config).items():
            value = getattr(self, name)
            if option.choices and value not in option.choices:
                raise ConfigError(name, f"must be one of {', '.join(option.choices)}, got {value!r}")
        self._check_loss()
        self._check_numbers()
        self._check_reference()
        self._check_lora()

    def _check_loss(self) -> None:
        if self.loss not in LOSSES:
            hint = (f" (fastdpo, like TRL, calls it {LOSS_NAMES[self.loss]!r})" if self.loss in LOSS_NAMES
                    else _close(self.loss, LOSSES))
            raise ConfigError("loss", f"unknown loss {self.loss!r}{hint}; choose one of {', '.join(LOSSES)}")
        if not self.beta > 0:
            raise ConfigError("beta", f"must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if not self.discopop_tau > 0:
            raise ConfigError("discopop_tau", f"must be > 0, got {self.discopop_tau}")
        if self.rpo_alpha < 0:
            raise ConfigError("rpo_alpha", f"must be >= 0, got {self.rpo_alpha}")
        if self.loss == "exo_pair" and self.label_smoothing <= 0:
            raise ConfigError("label_smoothing", "exo_pair needs label_smoothing > 0 (the EXO paper suggests 1e-3)")
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
        for name in PARAMETERS:  # a parameter the chosen loss does not read would silently do nothing
            if getattr(self, name) != defaults[name] and name not in LOSSES[self.loss].params:
                raise ConfigError(name, f"--loss {self.loss} does not use it (it is a parameter of "
                                        f"{', '.join(users_of(name))}); drop it or choose one of those losses")

    def _check_numbers(self) -> None:
        for key in ("batch_size", "max_length", "max_prompt_length", "max_bad_steps", "logging_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("eval_samples", "micro_batch_size", "eval_batch_size", "max_steps", "warmup_steps", "save_steps", "eval_steps",
                    "save_total_limit", "pack_length", "logits_chunk_size", "lora_r", "ref_sync_steps",
                    "learning_rate", "weight_decay", "max_grad_norm"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.num_samples < 1 or self.max_new_tokens < 1:
            key = "num_samples" if self.num_samples < 1 else "max_new_tokens"
            raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.temperature < 0 or self.top_k < 0:
            key = "temperature" if self.temperature < 0 else "top_k"
            raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        trackers = [t.strip() for t in self.report_to.split(",")]
        unknown = [t for t in trackers if t not in TRACKERS]
        if unknown or ("none" in trackers and len(trackers) > 1):
            raise ConfigError("report_to", f"{self.report_to!r}: none, or a comma list of "
                                           f"{', '.join(t for t in TRACKERS if t != 'none')}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.max_steps == 0 and not self.epochs > 0:
            raise ConfigError("epochs", f"must be > 0 when max_steps is 0, got {self.epochs}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError("max_prompt_length", f"{self.max_prompt_length} is not below --max_length "
                                                   f"{self.max_length}: a prompt that long leaves no room for a "
                                                   f"response; set it below {self.max_length} (for example "
                                                   f"{max(1, self.max_length // 2)})")

    def _check_reference(self) -> None:
        kind = self.reference_kind()
        if kind == "model" and not self.ref_model:
            raise ConfigError("reference", "'model' needs --ref_model DIR")
        if self.ref_model and kind in ("copy", "none"):
            raise ConfigError("reference", f"{kind!r} does not use --ref_model {self.ref_model}; drop one of them")
        if kind == "none" and self.loss not in REFERENCE_FREE:
            raise ConfigError("reference", f"'none' works only with the reference-free losses "
                                           f"({', '.join(sorted(REFERENCE_FREE))}); --loss {self.loss} needs a "
                                           "reference")
        if not 0 < self.ref_sync_alpha <= 1:
            raise ConfigError("ref_sync_alpha", f"must be in (0, 1], got {self.ref_sync_alpha}")
        if self.ref_sync_steps and kind == "precomputed":
            raise ConfigError("ref_sync_steps", "TR-DPO updates the reference during training; a precomputed "
                                                "reference cannot change (use --reference copy)")
        if self.ref_sync_steps and kind == "none":
            raise ConfigError("ref_sync_steps", "there is no reference to update with --reference none")

    def _check_lora(self) -> None:
        if self.merge_lora and not self.lora:
            raise ConfigError("merge_lora", "needs LoRA (--lora_r R or --adapter DIR)")
        if self.load_in_4bit and not self.lora:
            raise ConfigError("load_in_4bit", "a 4-bit base cannot be trained directly; add --lora_r R (QLoRA)")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.ref_sync_steps and self.lora:
            raise ConfigError("ref_sync_steps", "TR-DPO with LoRA is not supported: the reference is the base with "
                                                "adapters off and cannot be softly updated toward the adapted policy")

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


class ConfigError(UserError):
    """A bad value of one key; the builders add where it was written (a flag, a YAML file, a keyword)."""

    def __init__(self, key: str, why: str, where: str = "--"):
        super().__init__(f"{where}{key}: {why}", exit_code=2)
        self.key, self.why = key, why


# --- options: what the parser, the help and the docs read ---------------------------------------------------------


@dataclass(frozen=True)
class Option:
    name: str
    type: type  # bool, int, float or str
    default: Any
    help: str
    choices: tuple[str, ...] = ()  # the allowed values of a Literal field
    eval: bool = False  # `fastdpo eval` takes it too
    generate: bool = False  # a sampling option (`fastdpo generate`)

    @property
    def switch(self) -> bool:
        """A bare `--flag` means true."""
        return self.type is bool or "true" in self.choices


@functools.cache
def options(cls=Config) -> dict[str, Option]:
    """The options of a dataclass of `_f` fields (the config, or a command's own options), by name."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        choices = tuple(args) if typing.get_origin(hint) is Literal else ()
        typ = str if choices else (args[0] if args and typing.get_origin(hint) is typing.Union else hint)
        out[f.name] = Option(f.name, typ, f.default, f.metadata["help"], choices, f.metadata.get("eval", False),
                             f.metadata.get("generate", False))
    return out


def field_types(cls=Config) -> dict[str, type]:
    return {name: option.type for name, option in options(cls).items()}


_BOOL_WORDS = {**dict.fromkeys(("true", "1", "yes", "on"), "true"),
               **dict.fromkeys(("false", "0", "no", "off"), "false")}


def convert(option: Option, value, where: str):
    """A YAML, command-line or keyword value in the option's type, or a ConfigError naming the key."""
    if value is None:
        return None
    bad = ConfigError(option.name, f"expected {_kind(option)}, got {value!r}", where)
    if option.type is bool or option.switch:
        word = _BOOL_WORDS.get(str(value).strip().lower()) if not isinstance(value, bool) else str(value).lower()
        if option.type is bool:
            if word is None:
                raise bad
            return word == "true"
        value = word or value
    try:
        if option.type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if option.type is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
    except (TypeError, ValueError):
        raise bad from None
    if isinstance(value, (dict, list)) or not isinstance(value, (str, int, float)):
        raise bad
    value = str(value)
    if option.switch and value not in option.choices:
        raise bad
    if option.choices and value not in option.choices:
        raise ConfigError(option.name, f"must be one of {', '.join(option.choices)}, got {value!r}"
                                       f"{_close(value, option.choices)}", where)
    return value


def _kind(option: Option) -> str:
    if option.choices:
        return ", ".join(option.choices[:-1]) + " or " + option.choices[-1]
    return option.type.__name__


# names from TRL's DPOConfig, Hugging Face TrainingArguments and common shorthand -> what fastdpo calls them
TRL_NAMES = {
    "lr": "learning_rate", "num_train_epochs": "epochs", "per_device_train_batch_size": "micro_batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "lr_scheduler_type": "lr_scheduler", "loss_type": "loss",
    "overwrite_output_dir": "overwrite", "resume_from_checkpoint": "resume", "model_name_or_path": "model",
    "ref_model_name_or_path": "ref_model", "dataset_name": "data", "dataset_train_split": "data_split",
    "dataset_test_split": "eval_data_split", "eval_dataset": "eval_data", "train_dataset": "data",
    "max_completion_length": "max_length", "padding_free": "packing", "use_peft": "lora_r",
    "lora_target_modules": "lora_targets", "ref_model_sync_steps": "ref_sync_steps",
    "ref_model_mixup_alpha": "ref_sync_alpha", "sync_ref_model": "ref_sync_steps",
    "precompute_ref_log_probs": "reference", "bf16": "precision", "fp16": "precision",
    "gradient_accumulation_steps": "batch_size", "warmup_ratio": "warmup_steps", "eval_strategy": "eval_steps",
    "evaluation_strategy": "eval_steps", "save_strategy": "save_steps", "logging_strategy": "logging_steps",
    "disable_tqdm": "progress", "dataset_num_proc": None, "dataloader_num_workers": None, "optim": None,
    "disable_dropout": None, "dtype": "torch_dtype",
}
TRL_HOW = {  # how to say it in fastdpo where a plain rename is not all
    "precompute_ref_log_probs": "--reference precomputed", "bf16": "--precision bf16", "fp16": "--precision fp16",
    "dtype": "--torch_dtype auto|float32|bfloat16|float16 (the weights' dtype; --precision sets autocast)",
    "use_peft": "--lora_r R (a rank above 0 is LoRA)", "sync_ref_model": "--ref_sync_steps N",
    "gradient_accumulation_steps": "--batch_size (the pairs of one optimizer step over all processes; "
                                   "--micro_batch_size is the pairs of one forward pass)",
    "warmup_ratio": "--warmup_steps (in optimizer steps)", "eval_strategy": "--eval_steps N",
    "evaluation_strategy": "--eval_steps N", "save_strategy": "--save_steps N", "logging_strategy": "--logging_steps N",
    "disable_tqdm": "--progress false", "dataset_num_proc": "nothing: data preparation uses every core itself",
    "dataloader_num_workers": "nothing: data preparation uses every core itself",
    "optim": "nothing: fastdpo trains with AdamW (--adam_beta1, --adam_beta2, --adam_epsilon, --weight_decay)",
    "disable_dropout": "nothing: fastdpo always disables dropout in the policy and the reference",
}
LOSS_NAMES = {"dpo": "sigmoid", "cdpo": "sigmoid", "kto_pair": "bco_pair", "slic": "hinge", "nca": "nca_pair",
              "exo": "exo_pair", "sppo": "sppo_hard", "bco": "bco_pair", "apo": "apo_zero", "cpo": "simpo"}


def _close(word: str, known, form: str = "{!r}") -> str:
    """' (did you mean X?)' for the known name closest to `word`, written in `form`, or ''; a TRL or Trainer name
    gets the fastdpo name it stands for."""
    if word in TRL_NAMES and form != "{!r}":
        how = TRL_HOW.get(word) or form.format(TRL_NAMES[word])
        return f" (in fastdpo: {how})"
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {form.format(close[0])}?)" if close else ""


def parse_flags(argv: list[str], known: dict[str, Option]) -> dict:
    """`--key value`, `--key=value`, and a bare `--switch` (true) -> {key: typed value}."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument {arg!r}: options look like --key value", exit_code=2)
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in known:
            raise UserError(f"unknown flag --{key}{_close(key, known, '--{}')}", exit_code=2)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if known[key].switch and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise UserError(f"--{key}: needs a value", exit_code=2)
            else:
                value, i = nxt, i + 1
        out[key] = convert(known[key], value, "--")
        i += 1
    return out


def load_yaml(path: str, known: dict[str, Option]) -> dict:
    """The keys of a YAML config file, typed; an unknown key or a bad value names the file and the key."""
    if not os.path.isfile(path):
        raise UserError(f"--config: {path}: no such file", exit_code=2)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0]
        raise UserError(f"--config: {path}: not valid YAML ({first})", exit_code=2) from None
    if not isinstance(data, dict):
        raise UserError(f"--config: {path}: expected a mapping of keys to values", exit_code=2)
    out = {}
    for key, value in data.items():
        if key not in known:
            raise UserError(f"{path}: unknown config key {key}{_close(str(key), known, '{}')}", exit_code=2)
        out[key] = convert(known[key], value, f"{path}: ")
    return out


def from_keywords(values: dict, known: dict[str, Option] | None = None, caller: str = "fastdpo") -> dict:
    """Python API keywords -> typed values; an unknown keyword is an error that suggests the closest name."""
    known = known or options(Config)
    out = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"{caller}() got an unknown option {key!r}{_close(key, known, '{}=')}", exit_code=2)
        out[key] = convert(known[key], value, "")
    return out


def make_config(values: dict, sources: dict[str, str] | None = None) -> Config:
    """A resolved Config of typed values; a validation error names where its key was written."""
    try:
        return Config(**values).resolve()
    except ConfigError as e:
        where = (sources or {}).get(e.key, "--")
        if where == "--":
            raise
        raise ConfigError(e.key, e.why, where) from None


def split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config FILE, the other arguments)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config: needs a YAML file", exit_code=2)
            return argv[i + 1], argv[:i] + argv[i + 2:]
    return None, argv


def parse_command(argv: list[str], keys: typing.Iterable[str] | None = None, extra=None,
                  base_file: str | None = None):
    """A command's arguments `[--config FILE] [--key value ...]` -> (resolved Config, `extra` options or None).

    Precedence: defaults < `base_file` < the --config file < flags. `keys`: the config keys the command takes
    (all by default); `extra`: a dataclass of the command's own options (flags only, not YAML keys)."""
    every = options(Config)
    known = {k: every[k] for k in keys} if keys is not None else dict(every)
    own = options(extra) if extra is not None else {}
    config_file, argv = split_config_flag(argv)
    values, sources = {}, {}
    for path, allowed in ((base_file, every), (config_file, known)):
        if path:
            read = load_yaml(path, allowed)
            values.update(read)
            sources.update(dict.fromkeys(read, f"{path}: "))
    flags = parse_flags(argv, {**known, **own})
    values.update({k: v for k, v in flags.items() if k not in own})
    sources.update(dict.fromkeys(flags, "--"))
    return make_config(values, sources), (extra(**{k: v for k, v in flags.items() if k in own}) if extra else None)


def build_config(argv: list[str], allowed: typing.Iterable[str] | None = None,
                 base_file: str | None = None) -> Config:
    """A resolved Config from `[--config FILE] [--key value ...]` (see `parse_command`)."""
    return parse_command(argv, allowed, base_file=base_file)[0]


def eval_keys() -> list[str]:
    """The config keys `fastdpo eval` takes: those marked for eval, the loss parameters among them."""
    return [name for name, option in options(Config).items() if option.eval]


def score_keys() -> list[str]:
    """The config keys `fastdpo score` and `rank` take: the eval keys but the loss's."""
    loss = {"loss", "reference", *PARAMETERS, "rpo_alpha", "label_smoothing"}
    return [name for name, option in options(Config).items() if option.eval and name not in loss]


def generate_keys() -> list[str]:
    """The config keys `fastdpo generate` takes: `score_keys` and the sampling options."""
    return [name for name, option in options(Config).items() if option.generate or name in score_keys()]


def option_help(known: dict[str, Option]) -> str:
    """`--help` lines: each option with its help and default."""
    lines = []
    for option in known.values():
        default = "none" if option.default is None else option.default
        lines.append(f"  --{option.name:<22} {option.help} (default: {default})")
    return "\n".join(lines)
