"""`fastdpo` sub-commands: parse flags into the config, call one function each, turn user errors into one line."""

from __future__ import annotations

import json
import sys

from fastdpo.errors import UserError

USAGE = """usage: fastdpo <command> [options]

commands:
  train   fine-tune a policy with DPO (no options: the built-in quickstart)
  eval    score a policy against a reference on preference data

`fastdpo <command> --help` lists the command's options."""

EVAL_KEYS = ("model", "ref_model", "data", "data_split", "prompt_field", "chosen_field", "rejected_field",
             "on_bad_record", "max_length", "max_prompt_length", "loss", "beta", "label_smoothing", "simpo_gamma",
             "discopop_tau", "rpo_alpha", "batch_size", "precision", "seed", "trust_remote_code", "prefix_sharing",
             "packing", "pack_length", "logits_chunk_size")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = _dispatch(argv)
    except UserError as e:
        print(f"fastdpo: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("fastdpo: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_command(rest)
    if command == "eval":
        return eval_command(rest)
    if command in ("--version", "version"):
        from fastdpo import __version__

        print(f"fastdpo {__version__}")
        return 0
    raise UserError(f"unknown command {command!r}; commands: train, eval", exit_code=2)


def _help(keys, extra: dict[str, str] | None = None) -> str:
    import dataclasses

    from fastdpo.config import Config

    lines = []
    for f in dataclasses.fields(Config):
        if f.name in keys:
            lines.append(f"  --{f.name:<20} {f.metadata['help']} (default: {f.default})")
    for key, text in (extra or {}).items():
        lines.append(f"  --{key:<20} {text}")
    return "\n".join(lines)


def train_command(argv: list[str]) -> int:
    from fastdpo.config import Config, build_config, field_types
    from fastdpo.models import asset_path

    if "-h" in argv or "--help" in argv:
        print("usage: fastdpo train [--config FILE.yaml] [--KEY VALUE ...]\n\noptions:\n"
              + _help(field_types(Config), {"config": "YAML file of the options below"}))
        return 0
    quickstart = not any(a in ("--config", "--model") or a.startswith(("--config=", "--model=")) for a in argv)
    base = asset_path("quickstart.yaml") if quickstart else None
    cfg = build_config(argv, base_file=base)
    if quickstart:
        print("fastdpo: no --model or --config given: running the built-in quickstart "
              f"(settings: {base})", file=sys.stderr)
    from fastdpo.train import train

    train(cfg, quickstart=quickstart)
    return 0


def eval_command(argv: list[str]) -> int:
    from fastdpo.config import build_config

    extra = {"json": "print the metrics as one JSON object (the last line of stdout)",
             "per_pair_out": "FILE.jsonl: one line per pair with its log-probs, rewards, loss and token counts"}
    if "-h" in argv or "--help" in argv:
        print("usage: fastdpo eval --model DIR --ref_model DIR --data PATH [options]\n\noptions:\n"
              + _help(EVAL_KEYS, extra))
        return 0
    argv, as_json, per_pair_out = _pop_eval_flags(argv)
    cfg = build_config(argv, allowed=EVAL_KEYS)
    if not any(a in ("--data", "--config") or a.startswith(("--data=", "--config=")) for a in argv):
        raise UserError("--data: eval needs preference data (--data PATH)", exit_code=2)
    from fastdpo.losses import REFERENCE_FREE

    if not cfg.ref_model and cfg.loss not in REFERENCE_FREE:
        raise UserError(f"--ref_model: eval with --loss {cfg.loss} needs a reference model directory", exit_code=2)
    from fastdpo.evaluate import run_eval

    metrics, rows = run_eval(cfg)
    from fastdpo.parallel import Processes

    if not Processes.current().main:  # launched with several processes, each scored every pair: one reports
        return 0
    if per_pair_out:
        from fastdpo.checkpoint import atomic_write_text

        atomic_write_text(per_pair_out, "".join(json.dumps(r) + "\n" for r in rows))
    if as_json:
        print(json.dumps(metrics))
    else:
        print(format_table(metrics))
    return 0


def _pop_eval_flags(argv: list[str]) -> tuple[list[str], bool, str | None]:
    rest, as_json, per_pair_out, i = [], False, None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--json":
            as_json = True
        elif arg == "--per_pair_out" or arg.startswith("--per_pair_out="):
            if "=" in arg:
                per_pair_out = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                per_pair_out, i = argv[i + 1], i + 1
            else:
                raise UserError("--per_pair_out: needs a file name", exit_code=2)
        else:
            rest.append(arg)
        i += 1
    return rest, as_json, per_pair_out


def format_table(metrics: dict) -> str:
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    for key, value in metrics.items():
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
