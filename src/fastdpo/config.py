"""The one typed config: every field is a YAML key and a `--flag`; unknown keys are errors that name the key."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field

import yaml

from fastdpo.errors import UserError
from fastdpo.losses import LOSSES, REFERENCE_FREE


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class Config:
    # --- models -------------------------------------------------------------------------------------------------
    model: str = _f("builtin:tiny", "policy to train: a local model directory, a hub id, or builtin:tiny")
    ref_model: typing.Optional[str] = _f(None, "reference model directory (implies --reference model)")
    reference: str = _f("copy", "copy: frozen in-memory copy of the starting policy; model: --ref_model; "
                                "precomputed: log-probs computed once, cached, model freed; none: reference-free")
    ref_cache_dir: str = _f("", "cache of precomputed reference log-probs ('': ~/.cache/fastdpo/reference; "
                                "off: no cache)")
    trust_remote_code: bool = _f(False, "allow model code from the model directory / hub (off: safe default)")
    # --- data ---------------------------------------------------------------------------------------------------
    data: str = _f("builtin:example", ".jsonl, .json, .parquet, a save_to_disk directory or a hub data set")
    data_split: str = _f("train", "split to read from a data set directory or hub data set")
    eval_data: typing.Optional[str] = _f(None, "held-out preference data, evaluated every eval_steps and at the end")
    eval_data_split: str = _f("test", "split of eval_data to read")
    prompt_field: str = _f("prompt", "record field holding the prompt (absent: implicit prompt)")
    chosen_field: str = _f("chosen", "record field holding the chosen (preferred) response")
    rejected_field: str = _f("rejected", "record field holding the rejected response")
    on_bad_record: str = _f("error", "error: stop at the first bad record; skip: skip bad records and count them")
    max_length: int = _f(1024, "tokens of prompt + response; responses keep their start")
    max_prompt_length: int = _f(512, "tokens of prompt; the prompt keeps its end")
    # --- loss ---------------------------------------------------------------------------------------------------
    loss: str = _f("sigmoid", "loss variant: " + ", ".join(LOSSES))
    beta: float = _f(0.1, "KL strength β (inverse temperature of the implicit reward)")
    label_smoothing: float = _f(0.0, "label-flip rate ε in [0, 0.5): cDPO for sigmoid; robust, exo_pair, aot")
    simpo_gamma: float = _f(0.5, "SimPO target reward margin γ")
    discopop_tau: float = _f(0.05, "DiscoPOP temperature τ")
    rpo_alpha: float = _f(0.0, "weight of the chosen response's mean token NLL added to the loss (RPO)")
    # --- optimisation -------------------------------------------------------------------------------------------
    learning_rate: float = _f(1e-6, "AdamW peak learning rate")
    lr_scheduler: str = _f("linear", "constant, linear or cosine decay after warm-up")
    warmup_steps: int = _f(0, "optimizer steps of linear warm-up from 0")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    adam_beta1: float = _f(0.9, "AdamW β1")
    adam_beta2: float = _f(0.999, "AdamW β2")
    adam_epsilon: float = _f(1e-8, "AdamW ε")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0: no clipping)")
    batch_size: int = _f(8, "preference pairs per optimizer step, over all processes")
    micro_batch_size: int = _f(0, "pairs per forward pass per process (0: the whole per-process batch)")
    eval_batch_size: int = _f(0, "pairs per forward pass in evaluation (0: micro_batch_size)")
    max_steps: int = _f(0, "optimizer steps (0: from epochs)")
    epochs: float = _f(1.0, "passes over the training pairs when max_steps is 0")
    shuffle: bool = _f(True, "shuffle the pairs each epoch (seeded)")
    seed: int = _f(42, "seed for data order, initialisation of builtin models, dropout")
    precision: str = _f("fp32", "fp32, bf16 or fp16 (mixed precision via autocast)")
    # --- outputs ------------------------------------------------------------------------------------------------
    output_dir: str = _f("fastdpo-output", "where the model, config, metrics and checkpoints go")
    overwrite: bool = _f(False, "allow a non-empty output_dir (its old contents go once data and models have loaded)")
    resume: bool = _f(False, "continue from the latest checkpoint in output_dir")
    save_steps: int = _f(0, "write a checkpoint every N optimizer steps (0: never mid-run)")
    save_total_limit: int = _f(2, "keep at most this many checkpoints (0: keep all)")
    eval_steps: int = _f(0, "evaluate on eval_data every N steps (0: only before and after training)")
    logging_steps: int = _f(10, "write a metrics.jsonl line every N optimizer steps")
    progress: bool = _f(True, "show a progress bar")
    max_bad_steps: int = _f(10, "stop after this many steps in a row with a non-finite loss or gradients")
    # --- LoRA and the reference ------------------------------------------------------------------------------
    lora_r: int = _f(0, "LoRA rank (0: full fine-tuning); the reference is then the base with adapters off")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input (0: exact reference log-probs in training)")
    lora_targets: str = _f("all-linear", "modules to adapt: all-linear (every linear layer of the blocks) or "
                                         "comma-separated names such as q_proj,v_proj")
    adapter: typing.Optional[str] = _f(None, "start from this LoRA adapter directory; a frozen copy of it is the "
                                             "reference")
    merge_lora: bool = _f(False, "also write the merged full model to OUTPUT_DIR/merged")
    load_in_4bit: bool = _f(False, "QLoRA: load the base in 4-bit NF4 through bitsandbytes (CUDA only)")
    ref_sync_steps: int = _f(0, "TR-DPO: every N steps, ref <- alpha * policy + (1 - alpha) * ref (0: never)")
    ref_sync_alpha: float = _f(0.6, "TR-DPO mixing weight alpha in (0, 1]")
    # --- speed and memory (each is exact: the same log-probs as the plain path) --------------------------------
    prefix_sharing: bool = _f(True, "one [prompt|chosen|rejected] sequence per pair: the prompt computed once")
    packing: bool = _f(True, "pack several pairs into one row (block-diagonal attention), no padding")
    pack_length: int = _f(0, "tokens per packed row (0: the longest pair of the micro-batch)")
    group_by_length: bool = _f(False, "batch pairs of similar length together (less padding when not packing)")
    logits_chunk_size: int = _f(256, "response positions per lm_head chunk (0: the model's full logits)")
    gradient_checkpointing: str = _f("auto", "recompute activations in backward: less memory, more time (true or "
                                             "a bare --gradient_checkpointing, false; auto: on with LoRA, off for "
                                             "full fine-tuning)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(key, why):
            raise UserError(f"--{key}: {why}", exit_code=2)

        if self.loss not in LOSSES:
            close = difflib.get_close_matches(self.loss, LOSSES, n=1)
            bad("loss", f"unknown loss {self.loss!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; choose one of {', '.join(LOSSES)}")
        if not self.beta > 0:
            bad("beta", f"must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            bad("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss == "exo_pair" and self.label_smoothing <= 0:
            bad("label_smoothing", "exo_pair needs label_smoothing > 0 (the EXO paper suggests 1e-3)")
        if self.discopop_tau <= 0:
            bad("discopop_tau", f"must be > 0, got {self.discopop_tau}")
        if self.ref_model and self.reference == "copy":
            self.reference = "model"
        if self.loss in REFERENCE_FREE and self.reference == "copy":
            self.reference = "none"  # nothing to copy: simpo and orpo never use a reference
        choices = {"reference": ("copy", "model", "none", "precomputed"),
                   "lr_scheduler": ("constant", "linear", "cosine"),
                   "precision": ("fp32", "bf16", "fp16"), "on_bad_record": ("error", "skip")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, f"must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.reference == "model" and not self.ref_model:
            bad("reference", "'model' needs --ref_model DIR")
        if self.reference == "none" and self.loss not in REFERENCE_FREE:
            bad("reference", f"'none' works only with the reference-free losses "
                             f"({', '.join(sorted(REFERENCE_FREE))}); --loss {self.loss} needs a reference")
        for key in ("batch_size", "max_length", "max_prompt_length"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("micro_batch_size", "eval_batch_size", "max_steps", "warmup_steps", "save_steps",
                    "eval_steps", "save_total_limit", "pack_length", "logits_chunk_size"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.max_bad_steps < 1:
            bad("max_bad_steps", f"must be >= 1, got {self.max_bad_steps}")
        if self.logging_steps < 1:
            bad("logging_steps", f"must be >= 1, got {self.logging_steps}")
        if self.learning_rate < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            bad("learning_rate", "learning_rate, weight_decay and max_grad_norm must be >= 0")
        if self.max_steps == 0 and not self.epochs > 0:
            bad("epochs", f"must be > 0 when max_steps is 0, got {self.epochs}")
        if self.lora_r < 0:
            bad("lora_r", f"must be >= 0, got {self.lora_r}")
        lora = self.lora_r > 0 or self.adapter
        if self.merge_lora and not lora:
            bad("merge_lora", "needs LoRA (--lora_r R or --adapter DIR)")
        checkpointing = _BOOL_WORDS.get(str(self.gradient_checkpointing).strip().lower(), "?")
        if checkpointing == "?":
            bad("gradient_checkpointing", f"expected true, false or auto, got {self.gradient_checkpointing!r}")
        # auto: a LoRA run is chosen to save memory (TRL and torchtune checkpoint by default); the resolved value
        # is what the saved config shows
        self.gradient_checkpointing = ("true" if lora else "false") if checkpointing == "auto" else checkpointing
        if self.precision == "fp16" and not _cuda():
            bad("precision", "fp16 autocast needs a CUDA GPU; on CPU use --precision bf16 (or fp32)")
        if self.load_in_4bit and not lora:
            bad("load_in_4bit", "a 4-bit base cannot be trained directly; add --lora_r R (QLoRA)")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.ref_sync_steps < 0 or not 0 < self.ref_sync_alpha <= 1:
            bad("ref_sync_alpha", "ref_sync_steps must be >= 0 and ref_sync_alpha in (0, 1]")
        if self.ref_sync_steps and self.reference == "precomputed":
            bad("ref_sync_steps", "TR-DPO updates the reference during training; a precomputed reference cannot "
                                  "change (use --reference copy)")
        if self.ref_sync_steps and self.reference == "none":
            bad("ref_sync_steps", "there is no reference to update with --reference none")
        if self.ref_sync_steps and lora:
            bad("ref_sync_steps", "TR-DPO with LoRA is not supported: the reference is the base with adapters off "
                                  "and cannot be softly updated toward the adapted policy")
        if self.resume:
            self.overwrite = False  # resuming never clears the directory (and a saved config may carry it)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


# --- parsing ----------------------------------------------------------------------------------------------------


_BOOL_WORDS = {**dict.fromkeys(("true", "1", "yes", "on"), "true"),
               **dict.fromkeys(("false", "0", "no", "off"), "false"), "auto": "auto"}
SWITCHES = ("gradient_checkpointing",)  # text fields that also take a bare --flag, meaning true


def field_types(cls=Config) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        out[f.name] = args[0] if args else t
    return out


def convert(key: str, value, typ: type, source: str):
    """Turn a YAML or command-line value into the field's type, or raise a UserError naming the key."""
    if value is None:
        return None
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            word = _BOOL_WORDS.get(str(value).strip().lower())
            if word not in ("true", "false"):
                raise ValueError
            return word == "true"
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}{key}: expected {typ.__name__}, got {value!r}", exit_code=2) from None


def _unknown(key: str, known, source: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {source}{close[0]}?)" if close else ""
    return UserError(f"unknown {'flag' if source == '--' else 'config key'} {source}{key}{hint}", exit_code=2)


def parse_flags(argv: list[str], allowed: typing.Iterable[str], types: dict[str, type]) -> dict:
    """`--key value`, `--key=value`, and bare `--switch` (= true) for booleans and SWITCHES -> {key: value}
    (values typed)."""
    allowed = list(allowed)
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument {arg!r}: options look like --key value", exit_code=2)
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in allowed:
            raise _unknown(key, allowed, "--")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if (types[key] is bool or key in SWITCHES) and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise UserError(f"--{key}: needs a value", exit_code=2)
            else:
                value, i = nxt, i + 1
        out[key] = convert(key, value, types[key], "--")
        i += 1
    return out


def load_yaml(path: str, allowed: typing.Iterable[str], types: dict[str, type]) -> dict:
    allowed = list(allowed)
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
        if key not in allowed:
            raise UserError(f"{path}: " + str(_unknown(str(key), allowed, "")), exit_code=2)
        out[key] = convert(key, value, types[key], f"{path}: ")
    return out


def build_config(argv: list[str], allowed: typing.Iterable[str] | None = None,
                 base_file: str | None = None) -> Config:
    """Config from `[--config FILE] [--key value ...]`: defaults < base_file < --config file < flags."""
    types = field_types()
    allowed = list(allowed or types)
    argv = list(argv)
    config_file = None
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config_file = arg.split("=", 1)[1]
                del argv[i]
            elif i + 1 < len(argv):
                config_file = argv[i + 1]
                del argv[i : i + 2]
            else:
                raise UserError("--config: needs a YAML file", exit_code=2)
            break
    values = {}
    if base_file:
        values.update(load_yaml(base_file, types, types))
    if config_file:
        values.update(load_yaml(config_file, allowed, types))
    values.update(parse_flags(argv, allowed, types))
    return Config(**values)
