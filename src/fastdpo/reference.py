"""Reference log-probs computed once: batched, without gradients, cached on disk and reused by later runs.

The cache key covers everything the numbers depend on: the reference weights, the token ids of every pair (so
the data, the tokenizer and the truncation settings) and the precision. A hit skips the reference model's
forward passes entirely.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time

import torch

from fastdpo.checkpoint import atomic_write_bytes
from fastdpo.logps import Scorer, split_pairs
from fastdpo.parallel import Processes
from fastdpo.tokenize import TokenizedPair


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fastdpo", "reference")


def weights_digest(model) -> str:
    """sha256 of every parameter and buffer, in name order (about 1 s per GB)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(weights: str, pairs: list[TokenizedPair], precision: str) -> str:
    h = hashlib.sha256(f"{weights}|{precision}|".encode())
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_reference_logps(scorer: Scorer, pairs: list[TokenizedPair], batch_size: int, device,
                            autocast) -> torch.Tensor:
    """Reference log-probs of every pair, in order. Shape: (N, 2) as (chosen, rejected)."""
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = scorer.collate(pairs[start : start + batch_size]).to(device)
        with autocast():
            logps, _ = scorer(batch)  # (2b,)
        chosen, rejected = split_pairs(logps.float().cpu())
        out.append(torch.stack([chosen, rejected], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2)  # a process's shard can be empty


def precompute_reference(scorer: Scorer, pair_sets: dict[str, list[TokenizedPair]], batch_size: int, device,
                         autocast, precision: str, cache_dir: str | None, log=print,
                         processes: Processes = Processes()) -> None:
    """Attach `reference_logps` to every pair of every set, from the cache when it has them.

    With several processes each computes its shard (`processes.shard`) and all of them receive every value; the
    main process writes the cache. A cache file is used only when every process can read it."""
    from safetensors.torch import load_file, save

    weights = weights_digest(scorer.model) if cache_dir else ""
    for name, pairs in pair_sets.items():
        start = time.perf_counter()
        path = os.path.join(cache_dir, cache_key(weights, pairs, precision) + ".safetensors") if cache_dir else None
        if path and all(processes.gather(os.path.isfile(path))):
            values = load_file(path)["reference_logps"]
            how = f"loaded from the cache {path}"
        else:
            shard = compute_reference_logps(scorer, processes.shard(pairs), batch_size, device, autocast)
            values = torch.stack(processes.unshard([list(s) for s in processes.gather(shard)]))  # (N, 2)
            how = f"computed in {time.perf_counter() - start:.1f} s" + \
                (f" by {processes.world} processes" if processes.world > 1 else "")
            if path and processes.main:
                atomic_write_bytes(path, save({"reference_logps": values.contiguous()}))
                how += f", cached at {path}"
        assert values.shape == (len(pairs), 2)
        for pair, (chosen, rejected) in zip(pairs, values.tolist()):
            pair.reference_logps = (chosen, rejected)
        log(f"reference log-probs for {len(pairs)} {name} pairs: {how}")


class AdapterReference:
    """The reference of a LoRA policy: the policy's own weights, scored with its adapters switched off (or with
    the frozen "ref" copy of a starting adapter active). No second model is held."""

    def __init__(self, scorer: Scorer, peft_model):
        self.scorer, self.peft_model = scorer, peft_model
        self.model = scorer.model  # what the cache key digests

    @property
    def layout(self) -> tuple:
        return self.scorer.layout

    def collate(self, pairs):
        return self.scorer.collate(pairs)

    @contextlib.contextmanager
    def _reference_weights(self):
        if "ref" in self.peft_model.peft_config:
            self.peft_model.set_adapter("ref")
            try:
                yield
            finally:
                self.peft_model.set_adapter("default")  # also makes "default" trainable again
        else:
            with self.peft_model.disable_adapter():
                yield

    def __call__(self, batch):
        with torch.no_grad(), self._reference_weights():
            return self.scorer(batch)


@torch.no_grad()
def sync_reference(reference, policy, alpha: float) -> None:
    """TR-DPO (arXiv:2404.09656, soft update): `ref <- alpha * policy + (1 - alpha) * ref`, parameter by parameter."""
    for (name, ref_param), (_, param) in zip(reference.named_parameters(), policy.named_parameters(), strict=True):
        ref_param.mul_(1 - alpha).add_(param.detach().to(ref_param.dtype), alpha=alpha)
