"""What a run did, for people: `fastdpo report RUN_DIR` (a PNG of its curves and a markdown summary) and the model
card (README.md) saved with each model. Both read only what a run writes: config.yaml, metrics.jsonl and
results.json."""

from __future__ import annotations

import json
import os

import yaml

from fastdpo.errors import UserError

# the report's panels: title, then (metrics.jsonl key, label) drawn for train and, where present, eval
PANELS = [
    ("loss", [("loss", "loss")]),
    ("reward accuracy", [("rewards/accuracies", "accuracy")]),
    ("reward margin", [("rewards/margins", "chosen − rejected")]),
    ("rewards", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")]),
    ("log-probs (policy)", [("logps/chosen", "chosen"), ("logps/rejected", "rejected")]),
    ("learning rate", [("learning_rate", "learning rate")]),
    ("gradient norm", [("grad_norm", "before clipping")]),
    ("throughput", [("pairs_per_second", "pairs/s")]),
    ("samples: KL(π‖π_ref) and reward", [("samples/kl", "mean KL (nats)"), ("samples/reward", "mean reward")]),
]


def read_run(run_dir: str) -> tuple[dict, list[dict], list[dict], list[dict], dict]:
    """A run directory's config, its train, eval and samples metrics lines, and results (a missing file is one
    line)."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run directory", exit_code=2)
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: no metrics.jsonl here; give the --output_dir of a fastdpo train run", exit_code=2)
    train, evals, samples = [], [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line a killed run left half-written
            kind = evals if any(k.startswith("eval/") for k in record) else \
                samples if any(k.startswith("samples/") for k in record) else train
            kind.append(record)
    config = _read(os.path.join(run_dir, "config.yaml"), yaml.safe_load) or {}
    results = _read(os.path.join(run_dir, "results.json"), json.load) or {}
    return config, train, evals, samples, results


def _read(path: str, load):
    try:
        with open(path, encoding="utf-8") as f:
            return load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return None


def plot(train: list[dict], evals: list[dict], path: str, title: str, samples: list[dict] = ()) -> list[str]:
    """The run's curves as a PNG at `path`, one panel per quantity it logged (train lines solid, eval dashed,
    the evaluations' samples dotted); returns the panels drawn."""
    train = list(train) + list(samples)  # the samples' keys are their own
    try:
        import matplotlib
    except ImportError:
        raise UserError("fastdpo report: matplotlib is not installed (pip install matplotlib)", exit_code=2) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, series) for name, series in PANELS
              if any(key in r for key, _ in series for r in train) or
              any(f"eval/{key}" in r for key, _ in series for r in evals)]
    columns = 3
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels):
        for key, label in series:
            own = "samples" if key.startswith("samples/") else "train"
            for records, prefix, style, kind in ((train, "", "-" if own == "train" else "s:", own),
                                                 (evals, "eval/", "o--", "eval")):
                points = [(r["step"], r[prefix + key]) for r in records if prefix + key in r]
                if points:
                    ax.plot(*zip(*points), style, label=f"{kind}: {label}", markersize=3)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [name for name, _ in panels]


def summary_markdown(config: dict, train: list[dict], evals: list[dict], results: dict, image: str | None,
                     samples: list[dict] = ()) -> str:
    """The run in markdown: what trained on what, and the metrics it ended with."""
    lines = [f"# fastdpo run: {config.get('output_dir', '')}", ""]
    lines += [f"- model: `{config.get('model')}`; reference: {config.get('reference')}"
              + (f" (`{config['ref_model']}`)" if config.get("ref_model") else ""),
              f"- data: `{config.get('data')}`" + (f"; eval data: `{config['eval_data']}`" if config.get("eval_data")
                                                   else ""),
              f"- loss: {config.get('loss')}, β = {config.get('beta')}; learning rate {config.get('learning_rate')}, "
              f"batch {config.get('batch_size')}, precision {config.get('precision')}",
              f"- steps: {train[-1]['step'] if train else 0}" + (f" of {results['steps']}" if results.get("steps")
                                                                  else ""), ""]
    if train:
        last = train[-1]
        lines += ["## Last logged training step", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_number(v)} |" for k, v in last.items() if isinstance(v, (int, float))]
        lines.append("")
    before, after = results.get("eval_before"), results.get("eval_after")
    if before or after:
        keys = list((after or before).keys())
        lines += ["## Held-out evaluation", "", "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {_number((before or {}).get(k))} | {_number((after or {}).get(k))} |" for k in keys]
        lines.append("")
    if samples:
        lines += ["## Samples at each evaluation (--eval_samples; the texts are in samples.jsonl)", "",
                  "| step | mean KL (nats) | mean reward | mean tokens | EOS rate |", "|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {_number(r.get('samples/kl'))} | {_number(r.get('samples/reward'))} | "
                  f"{_number(r.get('samples/tokens'))} | {_number(r.get('samples/eos_rate'))} |" for r in samples]
        lines.append("")
    if image:
        lines += [f"![training curves]({image})", ""]
    return "\n".join(lines)


def _number(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_report(run_dir: str) -> tuple[str, str, list[str]]:
    """`fastdpo report RUN_DIR`: RUN_DIR/report.png and RUN_DIR/report.md; returns their paths and the panels."""
    from fastdpo.outputs import atomic_write_text, claim

    config, train, evals, samples, results = read_run(run_dir)
    if not train and not evals:
        raise UserError(f"{run_dir}: metrics.jsonl holds no metrics yet", exit_code=2)
    claim(run_dir, "report.png", "report.md")
    image = os.path.join(run_dir, "report.png")
    panels = plot(train, evals, image, f"fastdpo: {os.path.basename(os.path.abspath(run_dir))} "
                                       f"({config.get('loss', '?')}, β = {config.get('beta', '?')})", samples)
    text = summary_markdown(config, train, evals, results, "report.png", samples)
    atomic_write_text(os.path.join(run_dir, "report.md"), text + "\n")
    return image, os.path.join(run_dir, "report.md"), panels


def model_card(config: dict, results: dict, last: dict | None) -> str:
    """The README.md saved beside a trained model: base model, data, loss and β, steps, final metrics, and the
    command that reproduces the run."""
    base = config.get("model")
    front = ["---", "library_name: transformers", "tags: [fastdpo, dpo]"]
    if isinstance(base, str) and base.count("/") == 1 and not os.path.exists(base):  # a hub id
        front.append(f"base_model: {base}")
    front.append("---")
    lines = front + ["", f"# {os.path.basename(os.path.abspath(config.get('output_dir', 'model')))}", "",
                     f"Fine-tuned from `{base}` with Direct Preference Optimization by fastdpo "
                     f"(loss `{config.get('loss')}`, β = {config.get('beta')}) on `{config.get('data')}`.", "",
                     "| setting | value |", "|---|---|"]
    for key in ("model", "ref_model", "reference", "data", "eval_data", "loss", "beta", "learning_rate",
                "lr_scheduler", "batch_size", "epochs", "max_steps", "max_length", "precision", "lora_r", "seed"):
        if config.get(key) not in (None, ""):
            lines.append(f"| {key} | `{config[key]}` |")
    lines.append(f"| steps | {results.get('steps')} |")
    after, before = results.get("eval_after"), results.get("eval_before")
    if after:
        lines += ["", "## Held-out evaluation", "", "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {_number((before or {}).get(k))} | {_number(v)} |" for k, v in after.items()]
    if last:
        lines += ["", "## Last logged training step", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_number(v)} |" for k, v in last.items() if isinstance(v, (int, float))]
    lines += ["", "## Reproduce", "", "The resolved config of the run is saved beside the model as `config.yaml`:",
              "", "```bash", "fastdpo train --config config.yaml", "```", "",
              "The policy is a reward model too: `fastdpo score --model THIS_DIR --ref_model "
              f"{config.get('ref_model') or base} --data PAIRS` gives β log π/π_ref of each response.", ""]
    return "\n".join(lines)
