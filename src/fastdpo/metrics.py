"""What the user sees: the progress bar and metrics.jsonl. Writers are no-op objects where disabled."""

from __future__ import annotations

import json
import os
import sys


class MetricsFile:
    """Appends one JSON line per logging step to `metrics.jsonl`; on resume, drops lines past the checkpoint."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                kept = [line for line in f if _step(line) is not None and _step(line) <= resume_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(kept)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


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
