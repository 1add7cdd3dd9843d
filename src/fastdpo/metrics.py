"""What the user sees: the progress bar and metrics.jsonl. Writers are no-op objects where disabled."""

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
    """tqdm bar on stderr: step, pairs/s, loss, reward accuracy, time left."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                        file=sys.stderr)

    def update(self, metrics: dict) -> None:
        self.bar.set_postfix({"loss": f"{metrics['loss']:.4f}", "acc": f"{metrics['rewards/accuracies']:.2f}",
                              "pairs/s": f"{metrics['pairs_per_second']:.1f}"}, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


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
