"""The reference: what gives the reference log-probs of a batch of pairs, in one of four forms.

- `ModelReference`: a frozen model (a copy of the starting policy, or `--ref_model`), scored in the run's layout;
- `AdapterReference`: a LoRA policy's own weights with its adapters switched off (or its frozen "ref" adapter);
- `PrecomputedReference`: the log-probs of every pair of one data set, computed once (batched, without gradients,
  cached on disk and reused by later runs) and held as an `(N, 2)` tensor beside the pairs;
- `NoReference`: zeros, for the reference-free losses.

`build_reference` makes the one the config asks for, for training and for `eval` alike.

The cache key covers everything the numbers depend on: the reference weights, the token ids of every pair (so
the data, the tokenizer and the truncation settings) and the precision. A hit skips the reference model's
forward passes entirely.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from typing import Sequence

import torch

from fastdpo.batching import Batch, Layout
from fastdpo.outputs import WriteError, atomic_write_bytes
from fastdpo.config import Config
from fastdpo.logps import LogpsModule, choose_layout, split_pairs
from fastdpo.models import ReferenceWeights, hold_matmul_weights_in
from fastdpo.runtime import Runtime
from fastdpo.tokenize import PairSet


class Reference:
    """The reference log-probs of a batch. `positions`: the batch's pairs' positions in the data set this reference
    serves (only a precomputed reference reads them). Shape: (2B,) as chosen then rejected, float32."""

    model = None  # the frozen reference model, where one is run (TR-DPO moves its weights)
    weights = None  # the module whose weights give the log-probs (what the cache key digests)

    def logps(self, batch: Batch, positions: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def placed(self, runtime: Runtime) -> "Reference":
        """This reference as the run's strategy holds it (a frozen model is sharded like the policy)."""
        return self


class NoReference(Reference):
    def logps(self, batch: Batch, positions: Sequence[int]) -> torch.Tensor:
        return torch.zeros(2 * batch.num_pairs, dtype=torch.float32, device=batch.input_ids.device)


class ModelReference(Reference):
    def __init__(self, module, model):
        self.module = module  # LogpsModule of the frozen model, or its strategy wrapper
        self.model = self.weights = model

    @torch.no_grad()
    def logps(self, batch: Batch, positions: Sequence[int]) -> torch.Tensor:
        return self.module(batch)[0]

    def placed(self, runtime: Runtime) -> Reference:
        return ModelReference(runtime.shard_frozen(self.module), self.model)


class PolicyReference(ModelReference):
    """The starting policy's own forward (to precompute from it): placed as the policy is, by the strategy's
    `prepare`."""

    def placed(self, runtime: Runtime) -> Reference:
        return self


class ToPrecompute(Reference):
    """A set's reference log-probs still to compute, once the model that computes them (`live`) is sharded: under
    FSDP and ZeRO-3 the other processes hold no weights before that. `placed` computes them."""

    def __init__(self, live: ModelReference, compute):
        self.live, self.compute = live, compute  # compute(placed live) -> PrecomputedReference


class AdapterReference(Reference):
    """No second model: the policy's forward with its adapters off, or with the frozen "ref" copy of a starting
    adapter active."""

    def __init__(self, policy_module: LogpsModule, peft_model):
        self.policy_module, self.peft_model = policy_module, peft_model
        self.weights = policy_module.model

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

    @torch.no_grad()
    def logps(self, batch: Batch, positions: Sequence[int]) -> torch.Tensor:
        with self._reference_weights():
            return self.policy_module(batch)[0]


class PrecomputedReference(Reference):
    def __init__(self, values: torch.Tensor):
        self.values = values  # (N, 2): (chosen, rejected) of every pair of the set, in order

    def logps(self, batch: Batch, positions: Sequence[int]) -> torch.Tensor:
        index = torch.as_tensor(list(positions), dtype=torch.long)
        picked = self.values[index]  # (B, 2)
        return torch.cat([picked[:, 0], picked[:, 1]]).to(batch.input_ids.device)  # (2B,)


def build_reference(cfg: Config, policy, policy_module: LogpsModule, weights: ReferenceWeights, layout: Layout,
                    pad_token_id: int, sets: dict[str, PairSet], runtime: Runtime
                    ) -> dict[str, Reference]:
    """The reference the config asks for, for each named set of pairs: one object shared by every set, except
    precomputed values, which belong to their set. `weights`: from `models.reference_weights`; `layout`: the run's.

    Call it before the policy is prepared (sharded): a precomputing model scores its shard of the pairs alone,
    except where only the main process holds the weights (FSDP, ZeRO-3), where the values are computed by `placed`
    with the sharded model. A live reference model is placed as the strategy holds it afterwards, by `placed`."""
    if weights.kind == "none":
        live = NoReference()
    elif weights.kind == "adapters":
        live = AdapterReference(policy_module, policy)
    elif weights.kind == "policy":
        live = PolicyReference(policy_module, policy)
    elif cfg.reference == "precomputed":  # a separate model that never scores training batches: its own layout
        check = lambda: choose_layout(cfg, [weights.model], list(sets.values()), pad_token_id,  # noqa: E731
                                      next(weights.model.parameters()).device, runtime.log)
        own = runtime.on_main(check) if runtime.weights_on_main else check()
        live, layout = ModelReference(LogpsModule(weights.model, own), weights.model), own
    else:
        live = ModelReference(LogpsModule(weights.model, layout), weights.model)
    if weights.kind == "model" and runtime.reference_dtype is not None:  # once its layout is checked (in fp32)
        held = hold_matmul_weights_in(weights.model, runtime.reference_dtype)
        dtype = str(runtime.reference_dtype).removeprefix("torch.")
        runtime.log(f"fastdpo: the frozen reference holds its matmul weights in {dtype}, as autocast computes them "
                    f"({held:.0%} of its weights)")
    if cfg.reference != "precomputed":
        return dict.fromkeys(sets, live)
    batch_size = cfg.eval_batch_size or cfg.micro_batch_size or cfg.batch_size
    digest = lambda: weights_digest(live.weights) if reference_cache_dir(cfg) else ""  # noqa: E731
    if runtime.weights_on_main:  # the main process's weights, before they are sharded
        digest = runtime.on_main(digest)
        return {name: ToPrecompute(live, lambda placed_live, pairs=pairs, name=name: precompute(
                    placed_live, pairs, name, layout, pad_token_id, batch_size, runtime, cfg, digest))
                for name, pairs in sets.items()}
    digest = digest()
    return {name: precompute(live, pairs, name, layout, pad_token_id, batch_size, runtime, cfg, digest)
            for name, pairs in sets.items()}


def placed(references: dict[str, Reference], runtime: Runtime) -> dict[str, Reference]:
    """The references as the strategy holds them, once the policy is prepared (a shared one is placed once);
    values still to precompute are computed by their placed model, which is then let go."""
    done: dict[int, Reference] = {}

    def place(reference: Reference) -> Reference:
        if id(reference) not in done:
            done[id(reference)] = reference.placed(runtime)
        return done[id(reference)]

    return {name: reference.compute(place(reference.live)) if isinstance(reference, ToPrecompute) else
            place(reference) for name, reference in references.items()}


# --- precomputed log-probs and their cache --------------------------------------------------------------------


def reference_cache_dir(cfg: Config) -> str | None:
    if cfg.ref_cache_dir == "off":
        return None
    return os.path.expanduser(cfg.ref_cache_dir) if cfg.ref_cache_dir else default_cache_dir()


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


def cache_key(weights: str, pairs: PairSet, precision: str) -> str:
    h = hashlib.sha256(f"{weights}|{precision}|{pairs.digest()}".encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_reference_logps(reference: Reference, pairs: PairSet, positions: list[int], layout: Layout,
                            pad_token_id: int, batch_size: int, runtime: Runtime, progress: bool = False
                            ) -> torch.Tensor:
    """Reference log-probs of the pairs at `positions`, in their order. Shape: (n, 2) as (chosen, rejected)."""
    from tqdm.auto import tqdm

    out = []
    bar = tqdm(total=len(positions), desc="reference log-probs", unit=" pairs", disable=not progress, leave=False,
               file=sys.stderr)
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        batch = layout.collate([pairs[i] for i in chunk], pad_token_id).to(runtime.device)
        with runtime.autocast():
            logps = reference.logps(batch, chunk)  # (2b,)
        chosen, rejected = split_pairs(logps.float().cpu())
        out.append(torch.stack([chosen, rejected], dim=1))
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out) if out else torch.zeros(0, 2)  # a process's shard can be empty


def precompute(reference: Reference, pairs: PairSet, name: str, layout: Layout, pad_token_id: int,
               batch_size: int, runtime: Runtime, cfg: Config, weights: str) -> PrecomputedReference:
    """The set's reference log-probs, from the cache when it has them.

    With several processes each computes its shard and all of them receive every value; the main process writes
    the cache. A cache file is used only when every process can read it."""
    from safetensors.torch import load_file, save

    processes, cache_dir, start = runtime.processes, reference_cache_dir(cfg), time.perf_counter()
    path = os.path.join(cache_dir, cache_key(weights, pairs, cfg.precision) + ".safetensors") if cache_dir else None
    if path and all(processes.gather(os.path.isfile(path))):
        values = load_file(path)["reference_logps"]
        how = f"loaded from the cache {path}"
    else:
        positions = processes.shard(list(range(len(pairs))))
        # sharded weights take every process into every forward: each runs as many batches, a short share padded
        # with a pair whose values are dropped
        pad = -(-len(pairs) // processes.world) - len(positions) if runtime.weights_on_main and len(pairs) else 0
        shard = compute_reference_logps(reference, pairs, positions + [0] * pad, layout, pad_token_id, batch_size,
                                        runtime, progress=cfg.progress and processes.main and sys.stderr.isatty()
                                        )[:len(positions)]
        values = torch.stack(processes.unshard([list(s) for s in processes.gather(shard)]))  # (N, 2)
        how = f"computed in {time.perf_counter() - start:.1f} s" + \
            (f" by {processes.world} processes" if processes.world > 1 else "")
        if path and processes.main:
            try:
                atomic_write_bytes(path, save({"reference_logps": values.contiguous()}), "the reference cache")
                how += f", cached at {path}"
            except WriteError as e:  # the cache only saves the next run this pass: a full disk costs no more
                how += f", not cached ({e})"
    assert values.shape == (len(pairs), 2)
    runtime.log(f"reference log-probs for {len(pairs)} {name} pairs: {how}")
    return PrecomputedReference(values)


@torch.no_grad()
def sync_reference(reference, policy, alpha: float) -> None:
    """TR-DPO (arXiv:2404.09656, soft update): `ref <- alpha * policy + (1 - alpha) * ref`, parameter by parameter."""
    for (name, ref_param), (_, param) in zip(reference.named_parameters(), policy.named_parameters(), strict=True):
        ref_param.mul_(1 - alpha).add_(param.detach().to(ref_param.dtype), alpha=alpha)
