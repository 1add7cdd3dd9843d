"""What the user sees: the progress bar or log lines, metrics.jsonl, and the trackers (TensorBoard, W&B, MLflow).
Writers are no-op objects where disabled, so the training loop has no branches for them."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass


class MetricsFile:
    """Appends one JSON line per logging step to `metrics.jsonl`; on resume, drops lines past the checkpoint.

    A line is appended whole or not at all: a failed write (a full disk) cuts the file back to where it was and
    raises `failure(error)`. `rewrite(path, text)`: writes a whole file atomically."""

    def __init__(self, path: str, resume_step: int | None = None, rewrite=None, failure=lambda error: error):
        self.path, self.failure = path, failure
        if resume_step is not None and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                kept = [line for line in f if _step(line) is not None and _step(line) <= resume_step]
            rewrite(path, "".join(kept))

    def write(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode("utf-8")
        with open(self.path, "ab") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError as e:
                f.truncate(size)
                raise self.failure(e) from None


class NoMetricsFile:
    def write(self, record: dict) -> None:
        pass


class ProgressBar:
    """tqdm bar on stderr (step, pairs/s, loss, reward accuracy, time left) where stderr is a terminal and
    `enabled`; elsewhere (a log file, a pipe, --progress false) one plain line per metrics.jsonl line (`logged`).
    `quiet`: neither (the processes that are not the main one)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, quiet: bool = False):
        from tqdm.auto import tqdm

        self.live = enabled and not quiet and sys.stderr.isatty()
        self.lines = not self.live and not quiet
        self.total, self.start, self.first = total, time.perf_counter(), initial
        self.bar = tqdm(total=total, initial=initial, disable=not self.live, unit="step", dynamic_ncols=True,
                        file=sys.stderr)

    def update(self, metrics: dict) -> None:
        self.bar.set_postfix({"loss": f"{metrics['loss']:.4f}", "acc": f"{metrics['rewards/accuracies']:.2f}",
                              "pairs/s": f"{metrics['pairs_per_second']:.1f}"}, refresh=False)
        self.bar.update(1)

    def logged(self, record: dict) -> None:
        """A metrics.jsonl record as one line, where there is no bar."""
        if not self.lines:
            return
        step, done = record["step"], record["step"] - self.first
        left = (time.perf_counter() - self.start) / max(done, 1) * (self.total - step)
        print(f"fastdpo: step {step}/{self.total} (epoch {record['epoch']:.2f}): loss {record['loss']:.4f}, reward "
              f"accuracy {record['rewards/accuracies']:.3f}, margin {record['rewards/margins']:.4f}, lr "
              f"{record['learning_rate']:.3g}, grad norm {record['grad_norm']:.3g}, "
              f"{record['pairs_per_second']:.2f} pairs/s, {_duration(left)} left", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Sinks:
    """Where a metrics record goes: metrics.jsonl, and each tracker of --report_to. Records are metrics.jsonl's
    (`step`, then TRL's names: `loss`, `rewards/chosen`, `logps/rejected`, ..., `eval/...` for evaluation);
    trackers get train records under `train/` and evaluation's as they are, as HF Trainer names them."""

    def __init__(self, metrics_file, trackers=(), samples_file=None):
        self.metrics_file, self.trackers = metrics_file, list(trackers)
        self.samples_file = samples_file or NoMetricsFile()

    def write(self, record: dict) -> None:
        self.metrics_file.write(record)
        step = record["step"]
        scalars = {(k if k.startswith(("eval/", "samples/")) else f"train/{k}"): float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(scalars, step)

    def samples(self, step: int, rows: list[dict]) -> None:
        """An evaluation's samples: a samples.jsonl line each, and a table for the trackers that show text."""
        for row in rows:
            self.samples_file.write({"step": step, **row})
        for tracker in self.trackers:
            tracker.samples(rows, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")[:300]


def tracker_names(report_to: str) -> list[str]:
    return [t.strip() for t in report_to.split(",") if t.strip() not in ("", "none")]


def tracker_dirs(report_to: str) -> list[str]:
    """The entries of OUTPUT_DIR the trackers write (fastdpo's, so --overwrite replaces them)."""
    return [name for name in tracker_names(report_to) if name in ("tensorboard", "wandb")]


def open_trackers(report_to: str, output_dir: str, config: dict, run_name: str, resume_step: int | None = None
                  ) -> list:
    """The trackers --report_to names, each imported only here; a missing package, or a tracker whose own set-up
    refuses to start, is one line naming it (the trackers already started are closed first). `resume_step`: a
    resumed run's checkpoint step (TensorBoard drops the killed run's points past it, as metrics.jsonl does)."""
    from fastdpo.errors import UserError

    trackers = []
    try:
        for name in tracker_names(report_to):
            kind = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}[name]
            try:
                trackers.append(kind(output_dir, config, run_name, resume_step))
            except UserError:
                raise
            except Exception as e:  # the tracker's own set-up (its server, credentials, backend) refused to start
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise UserError(f"--report_to {name}: the tracker could not start ({type(e).__name__}: {first})",
                                exit_code=2) from None
    except UserError:
        for started in trackers:
            started.close()
        raise
    return trackers


def _require(module: str, tracker: str, package: str):
    import importlib

    from fastdpo.errors import UserError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--report_to {tracker}: {package} is not installed (pip install {package})",
                        exit_code=2) from None


class TensorBoard:
    """Event files in OUTPUT_DIR/tensorboard (`tensorboard --logdir OUTPUT_DIR/tensorboard`)."""

    def __init__(self, output_dir: str, config: dict, run_name: str, resume_step: int | None = None):
        _require("tensorboard", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1  # a resumed run's points past its checkpoint go
        self.writer = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"), purge_step=purge)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def samples(self, rows: list[dict], step: int) -> None:
        table = ["| prompt | sample | KL | reward | tokens | EOS |", "|---|---|---|---|---|---|"]
        table += [f"| {_cell(r['prompt'])} | {_cell(r['response'])} | {r.get('kl', float('nan')):.3f} | "
                  f"{r.get('reward', float('nan')):.3f} | {r['tokens']} | {r['ended_with_eos']} |" for r in rows]
        self.writer.add_text("samples", "\n".join(table), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run (project $WANDB_PROJECT, default fastdpo) with the resolved config; its files under OUTPUT_DIR
    (WANDB_MODE=offline writes them there only, for `wandb sync` later)."""

    def __init__(self, output_dir: str, config: dict, run_name: str, resume_step: int | None = None):
        wandb = _require("wandb", "wandb", "wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastdpo"), name=run_name, config=config,
                              dir=output_dir)

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def samples(self, rows: list[dict], step: int) -> None:
        import wandb

        columns = ["prompt", "response", "kl", "reward", "tokens", "ended_with_eos"]
        data = [[str(r["prompt"]), r["response"], r.get("kl"), r.get("reward"), r["tokens"], r["ended_with_eos"]]
                for r in rows]
        self.run.log({"samples": wandb.Table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run (tracking URI and experiment from MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME) with the
    resolved config as its parameters."""

    def __init__(self, output_dir: str, config: dict, run_name: str, resume_step: int | None = None):
        self.mlflow = _require("mlflow", "mlflow", "mlflow")
        self.mlflow.start_run(run_name=run_name)
        self.mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, scalars: dict, step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def samples(self, rows: list[dict], step: int) -> None:
        self.mlflow.log_text("".join(json.dumps(r) + "\n" for r in rows), f"samples/step-{step}.jsonl")

    def close(self) -> None:
        self.mlflow.end_run()


def on_host(values: dict) -> dict:
    """Same-shaped tensors (per-pair metrics, (b,) each) moved to the CPU in one transfer: one host synchronisation
    for all of them, not one per key."""
    import torch

    if not values:
        return {}
    return dict(zip(values, torch.stack([v.detach().float() for v in values.values()]).cpu()))


def mean_metrics(parts: list[dict]) -> dict:
    """Pair-weighted means of per-pair metric tensors collected over micro-batches."""
    import torch

    return {key: torch.cat([p[key] for p in parts]).mean().item() for key in parts[0]}


def _step(line: str) -> int | None:
    """The step of a metrics line; None for a line a killed run left half-written."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


def pooled_means(parts: list[dict]) -> dict:
    """Per-process means, each with its `pairs` count -> the means over all their pairs."""
    parts = [p for p in parts if p.get("pairs")]
    total = sum(p["pairs"] for p in parts)
    out = {key: sum(p[key] * p["pairs"] for p in parts) / total for key in parts[0] if key != "pairs"}
    out["pairs"] = total
    return out


@dataclass
class StepRecord:
    """One optimizer step, as the logging window keeps it."""

    metrics: dict  # the step's means over its global batch
    grad_norm: float
    tokens: int  # tokens of the step's pairs, over all processes
    pairs: int


class LogWindow:
    """The steps since the last metrics.jsonl line: their pair-weighted means, and throughput over the window."""

    def __init__(self):
        self.steps: list[StepRecord] = []
        self.start = time.perf_counter()

    def add(self, step: StepRecord) -> None:
        self.steps.append(step)

    def pairs_per_second(self) -> float:
        return sum(s.pairs for s in self.steps) / max(time.perf_counter() - self.start, 1e-9)

    def flush(self, step: int, epoch: float, lr: float) -> dict:
        """The metrics.jsonl record of the window, which then starts again."""
        elapsed, pairs = max(time.perf_counter() - self.start, 1e-9), sum(s.pairs for s in self.steps)
        record = {"step": step, "epoch": round(epoch, 4), "learning_rate": lr}
        for key in self.steps[-1].metrics:
            record[key] = sum(s.metrics[key] * s.pairs for s in self.steps) / pairs
        record["grad_norm"] = sum(s.grad_norm for s in self.steps) / len(self.steps)
        record["pairs_per_second"] = pairs / elapsed
        record["tokens_per_second"] = sum(s.tokens for s in self.steps) / elapsed
        self.steps, self.start = [], time.perf_counter()
        return record
