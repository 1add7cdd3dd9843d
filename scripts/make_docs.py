"""Write docs/options.md from the config and the loss table (tests/test_docs.py checks it is in step).

    python scripts/make_docs.py
"""

from __future__ import annotations

import inspect
import os
import sys

from fastdpo.cli import EvalOutputs, GenerateOutputs, ScoreOutputs
from fastdpo.config import Config, Option, options
from fastdpo.losses import LOSSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "docs", "options.md")
SECTIONS = {"model": "Models and the reference", "data": "Data", "loss": "Loss", "learning_rate": "Optimisation",
            "output_dir": "Outputs", "lora_r": "LoRA and TR-DPO", "prefix_sharing": "Speed and memory",
            "num_samples": "Sampling (fastdpo generate)"}

HEAD = """# Options

Generated from `src/fastdpo/config.py` and the loss table in `src/fastdpo/losses.py` by
`python scripts/make_docs.py`; do not edit by hand.

Every option is a flag of `fastdpo train` (`--beta 0.1`, `--beta=0.1`; booleans also as a bare `--flag`), a key
of the YAML file given with `--config FILE`, and a keyword of `fastdpo.train(...)`. Flags override the file, the
file overrides the defaults. An unknown option, or a value of the wrong type or out of range, is an error that
names the option and where it was written (exit code 2). The resolved config (with `auto` values filled in) is
printed at the start of a run and saved as `OUTPUT_DIR/config.yaml`, which `--config` accepts as it is.
`fastdpo eval` and `fastdpo.evaluate(...)` take the options marked *eval*; `fastdpo generate` and
`fastdpo.generate(...)` those marked *eval* but the loss's, and the sampling options.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(option: Option) -> str:
    if option.default is None:
        return "none"
    return f"`{option.default!r}`" if option.default == "" else f"`{option.default}`"


def _kind(option: Option) -> str:
    if option.choices:
        return " \\| ".join(f"`{c}`" for c in option.choices)
    return option.type.__name__


def option_rows(known: dict[str, Option], sections: dict[str, str] | None = None) -> list[str]:
    lines = []
    for name, option in known.items():
        if sections and name in sections:
            lines += ["", f"### {sections[name]}", "", "| option | type | default | meaning | |", "|---|---|---|---|---|"]
        lines.append(f"| `--{name}` | {_kind(option)} | {_default(option)} | {_cell(option.help)} | "
                     f"{'eval' if option.eval else 'generate' if option.generate else ''} |")
    return lines


def loss_rows() -> list[str]:
    lines = ["| `--loss` | loss per pair (from its docstring) | parameters | reference |", "|---|---|---|---|"]
    for name, row in LOSSES.items():
        summary = " ".join(inspect.getdoc(row.fn).split("\n\n")[0].split())
        params = ", ".join(f"`--{p}`" for p in ("beta", *row.params))
        lines.append(f"| `{name}` | {_cell(summary)} | {params} | {'yes' if row.reference else 'no'} |")
    return lines


def render() -> str:
    lines = [HEAD.rstrip(), "", "## `fastdpo train`"]
    lines += option_rows(options(Config), SECTIONS)
    lines += ["", "## `fastdpo eval`", "", "The options marked *eval* above, and:", "",
              "| option | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `--{n}` | {_kind(o)} | {_default(o)} | {_cell(o.help)} |" for n, o in options(EvalOutputs).items()]
    lines += ["", "## `fastdpo generate`", "", "The options marked *eval* above but the loss's (`--loss`, "
              "`--reference` and the loss parameters), the sampling options, and:", "",
              "| option | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `--{n}` | {_kind(o)} | {_default(o)} | {_cell(o.help)} |" for n, o in options(GenerateOutputs).items()]
    lines += ["", "## `fastdpo score` and `fastdpo rank`", "", "The options marked *eval* above but the loss's, "
              "and:", "", "| option | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `--{n}` | {_kind(o)} | {_default(o)} | {_cell(o.help)} |" for n, o in options(ScoreOutputs).items()]
    lines += ["", "## Losses", "",
              "`--loss` picks a row of the loss table. Each loss reads `--beta` and the parameters of its row; "
              "giving a parameter the chosen loss does not read is an error. `--rpo_alpha` adds the chosen "
              "response's mean token NLL to any of them (RPO, arXiv:2404.19733). Notation: `cl = log "
              "π_θ(y_w|x) - log π_ref(y_w|x)`, `rl` likewise for the rejected response, `logits = cl - rl`, "
              "`|y|` the response's token count. docs/guide.md says where fastdpo and TRL differ.", ""]
    lines += loss_rows()
    return "\n".join(lines) + "\n"


def main() -> int:
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    with open(PATH, "w", encoding="utf-8") as f:
        f.write(render())
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
