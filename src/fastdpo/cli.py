"""`fastdpo` sub-commands: parse flags into the config, call one library function each, turn user errors into one
line. The quickstart lives here, not in the library."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional

from fastdpo.config import opt
from fastdpo.errors import UserError

USAGE = """usage: fastdpo <command> [options]

commands:
  train     fine-tune a policy with DPO (no options: the built-in quickstart)
  eval      score a policy against a reference on preference data
  generate  sample responses to prompts, each with its log-probs, KL from the reference and implicit reward
  score     the implicit reward β log π/π_ref of responses, pairs (accuracy per subset) or candidates
  rank      each prompt's candidates reordered by implicit reward, best first
  report    plots (PNG) and a markdown summary of a training run: fastdpo report RUN_DIR

`fastdpo <command> --help` lists the command's options."""

# a model or data of the user's, given by any of these options, means no quickstart settings at all
USER_INPUTS = ("model", "ref_model", "adapter", "data", "eval_data")


@dataclass
class EvalOutputs:
    """`fastdpo eval`'s own options (flags only)."""

    json: bool = opt(False, "print the metrics as one JSON object (the last line of stdout)")
    per_pair_out: Optional[str] = opt(None, "FILE.jsonl: one line per pair with its log-probs, rewards, loss and "
                                           "token counts")


@dataclass
class GenerateOutputs:
    """`fastdpo generate`'s own options (flags only)."""

    out: Optional[str] = opt(None, "FILE.jsonl: one line per sample (else the lines go to stdout)")
    json: bool = opt(False, "print the summary as one JSON object (the last line of stdout)")


@dataclass
class ScoreOutputs:
    """`fastdpo score`'s and `rank`'s own options (flags only)."""

    out: Optional[str] = opt(None, "FILE.jsonl: one line per record (else the lines go to stdout)")
    json: bool = opt(False, "print the summary as one JSON object (the last line of stdout)")
    response_field: str = opt("response", "field of a record's one response (beside its prompt)")
    candidates_field: str = opt("candidates", "field of a record's list of candidate responses (beside its prompt)")
    subset_field: Optional[str] = opt(None, "field whose values split the pairs' accuracy table (RewardBench's "
                                            "'subset')")
    length_normalize: bool = opt(False, "divide each reward by its response's tokens (β times the mean per-token "
                                        "log-ratio)")


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
    finally:
        _leave_process_group()
    sys.exit(code)


def _leave_process_group() -> None:
    """Destroy the process group (if the command joined one) before the interpreter exits: left to the exit, gloo's
    threads can be torn down mid-use ("terminate called without an active exception", 1 multi-process run in a
    few hundred here)."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_command(rest)
    if command == "eval":
        return eval_command(rest)
    if command == "generate":
        return generate_command(rest)
    if command in ("score", "rank"):
        return score_command(command, rest)
    if command == "report":
        return report_command(rest)
    if command in ("--version", "version"):
        from fastdpo import __version__

        print(f"fastdpo {__version__}")
        return 0
    raise UserError(f"unknown command {command!r}; commands: train, eval, generate, score, rank, report",
                    exit_code=2)


def is_quickstart(argv: list[str]) -> bool:
    """`fastdpo train` naming no config file and no model or data of the user's (an empty --eval_data "" only
    turns the quickstart's evaluation off)."""
    from fastdpo.config import options, parse_flags, split_config_flag

    config_file, rest = split_config_flag(argv)
    flags = parse_flags(rest, options())
    return config_file is None and not any(flags.get(key) for key in USER_INPUTS)


def train_command(argv: list[str]) -> int:
    from fastdpo.config import option_help, options, parse_command
    from fastdpo.data import asset_path

    if "-h" in argv or "--help" in argv:
        print("usage: fastdpo train --model M --data D [--config FILE.yaml] [--KEY VALUE ...]\n"
              "       fastdpo train   (no --model, --data or --config: the built-in quickstart)\n\noptions:\n"
              "  --config                 YAML file of the options below\n" + option_help(options()))
        return 0
    quickstart = is_quickstart(argv)
    base = asset_path("quickstart.yaml") if quickstart else None
    cfg, _ = parse_command(argv, base_file=base)
    if quickstart:
        print(f"fastdpo: no model, data or --config given: running the built-in quickstart (settings: {base})",
              file=sys.stderr)
    elif cfg.model is None:
        raise UserError("--model: which model should train? Pass a model directory or hub id (or --model "
                        "builtin:tiny, the tiny random model the quickstart trains)", exit_code=2)
    from fastdpo.runtime import Processes
    from fastdpo.training import train

    result = train(cfg)
    if quickstart and not result.stopped and Processes.current().main:
        print("  next: fastdpo train --model YOUR_MODEL_DIR --data YOUR_PAIRS.jsonl --output_dir OUT")
    return 0


def eval_command(argv: list[str]) -> int:
    from fastdpo.config import Config, eval_keys, options, option_help, parse_command

    if "-h" in argv or "--help" in argv:
        known = {k: options(Config)[k] for k in eval_keys()}
        print("usage: fastdpo eval --model DIR --ref_model DIR --data PATH [options]\n\noptions:\n"
              + option_help({**known, **options(EvalOutputs)}))
        return 0
    cfg, outputs = parse_command(argv, eval_keys(), EvalOutputs)
    from fastdpo.evaluation import run_eval
    from fastdpo.runtime import Processes

    result = run_eval(cfg)
    if not Processes.current().main:  # launched with several processes, each scored every pair: one reports
        return 0
    if outputs.per_pair_out:
        from fastdpo.outputs import atomic_write_text

        atomic_write_text(outputs.per_pair_out, "".join(json.dumps(r) + "\n" for r in result.rows))
    print(json.dumps(result.metrics) if outputs.json else format_table(result.metrics))
    return 0


def generate_command(argv: list[str]) -> int:
    from fastdpo.config import Config, generate_keys, options, option_help, parse_command

    if "-h" in argv or "--help" in argv:
        known = {k: options(Config)[k] for k in generate_keys()}
        print("usage: fastdpo generate --model DIR [--ref_model DIR] --data PROMPTS [--out FILE.jsonl] [options]\n\n"
              "options:\n" + option_help({**known, **options(GenerateOutputs)}))
        return 0
    cfg, outputs = parse_command(argv, generate_keys(), GenerateOutputs)
    from fastdpo.generation import print_summary, run_generate

    result = run_generate(cfg)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows)
    if outputs.out:
        from fastdpo.outputs import atomic_write_text

        atomic_write_text(outputs.out, lines)
    elif not outputs.json:
        sys.stdout.write(lines)
    print_summary(result.summary)
    if outputs.json:
        print(json.dumps(result.summary))
    return 0


def score_command(command: str, argv: list[str]) -> int:
    from fastdpo.config import Config, options, option_help, parse_command, score_keys

    if "-h" in argv or "--help" in argv:
        known = {k: options(Config)[k] for k in score_keys()}
        print(f"usage: fastdpo {command} --model DIR --ref_model DIR --data PATH [--out FILE.jsonl] [options]\n\n"
              "options:\n" + option_help({**known, **options(ScoreOutputs)}))
        return 0
    cfg, outputs = parse_command(argv, score_keys(), ScoreOutputs)
    from fastdpo.scoring import ScoreFields, format_summary, ranked, run_score

    result = run_score(cfg, ScoreFields(outputs.response_field, outputs.candidates_field, outputs.subset_field),
                       length_normalize=outputs.length_normalize)
    rows = ranked(result) if command == "rank" else result.rows
    if command == "rank" and not rows:
        raise UserError(f"--data: rank needs records with a list of candidates (field "
                        f"{outputs.candidates_field!r}; name another with --candidates_field)", exit_code=2)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if outputs.out:
        from fastdpo.outputs import atomic_write_text

        atomic_write_text(outputs.out, lines)
    elif not outputs.json:
        sys.stdout.write(lines)
    print(format_summary(result.summary), file=sys.stderr)
    if outputs.json:
        print(json.dumps(result.summary))
    return 0


def report_command(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv or len(argv) != 1 or argv[0].startswith("-"):
        print("usage: fastdpo report RUN_DIR\n\nwrites RUN_DIR/report.png (the run's curves: loss, reward accuracy "
              "and margin, rewards, log-probs, learning rate, gradient norm, throughput; train and eval) and "
              "RUN_DIR/report.md (a summary)", file=sys.stdout if argv in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv in (["-h"], ["--help"]) else 2
    from fastdpo.report import write_report

    image, summary, panels = write_report(argv[0])
    print(f"fastdpo: wrote {image} ({len(panels)} panels: {', '.join(panels)}) and {summary}", file=sys.stderr)
    return 0


def format_table(metrics: dict) -> str:
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    for key, value in metrics.items():
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
