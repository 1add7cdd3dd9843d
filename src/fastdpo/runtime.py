"""Where a run executes: the accelerator (device, mixed precision), the data-parallel processes, and the strategy
(one process, DDP, FSDP, DeepSpeed) with what each one needs done differently.

In a single process every collective is the identity; under `torchrun` / `accelerate launch` they use the process
group accelerate initialised (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastdpo.config import Config
from fastdpo.errors import UserError


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Processes":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This process's items: every `world`-th, starting at `rank` (`unshard` puts them back in order)."""
        return items[self.rank :: self.world]

    def gather(self, value) -> list:
        """Every process's `value` (any picklable object), in rank order, on every process."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def unshard(self, shards: list[list]) -> list:
        """The inverse of `shard`: the per-rank lists of `gather(shard(items))` -> items in their order."""
        out = [None] * sum(len(s) for s in shards)
        for rank, items in enumerate(shards):
            out[rank :: self.world] = items
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def micro_batches(self, positions: list[int], micro: int) -> list[tuple[list[int], float]]:
        """This process's micro-batches of a global batch, each with its loss scale (sum of per-pair losses /
        global pairs, once DDP has averaged the processes' gradients).

        Every process gets the same number of micro-batches, because FSDP gathers weights in every forward: where
        a short last batch leaves a process fewer, it runs a zero-scale copy of one pair, which changes no gradient
        but takes part in the collectives."""
        local = self.shard(positions)
        count = math.ceil(math.ceil(len(positions) / self.world) / micro)
        scale = self.world / len(positions)
        batches = [(local[i : i + micro], scale) for i in range(0, len(local), micro)]
        return batches + [(positions[:1], 0.0)] * (count - len(batches))


@dataclass
class Runtime:
    accelerator: object  # accelerate.Accelerator
    processes: Processes
    strategy: str  # "single", "ddp", "fsdp" or "deepspeed"

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.processes.main

    @property
    def sharded(self) -> bool:
        """Weights and optimizer state sharded over the processes (every process takes part in every forward)."""
        return self.strategy in ("fsdp", "deepspeed")

    @property
    def zero3(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3

    def log(self, text: str) -> None:
        """A line on stderr, from the main process only."""
        if self.main:
            print(text, file=sys.stderr)

    def autocast(self):
        return self.accelerator.autocast()

    def prepare(self, module, optimizer):
        """The training module and optimizer wrapped for the strategy (DDP / FSDP / DeepSpeed act in its forward)."""
        with warnings.catch_warnings():  # torch >= 2.10 renames DDP's broadcast_buffers; accelerate passes the old one
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
            return self.accelerator.prepare(module, optimizer)

    def shard_frozen(self, module):
        """A frozen module (a reference model's) placed like the policy, without an optimizer: FSDP shards it too
        and DeepSpeed ZeRO-3 runs it as an inference engine (other ZeRO stages hold it whole). DDP has nothing to
        synchronise in a frozen model, so there and in one process it stays as it is."""
        if self.strategy == "fsdp":
            if self.accelerator.is_fsdp2:  # accelerate shards FSDP2 models only with an optimizer: shard it here,
                from torch.distributed.fsdp import fully_shard  # a unit per decoder layer plus the root, as the policy

                layers = set(module._no_split_modules or ())
                for sub in module.modules():
                    if type(sub).__name__ in layers:
                        fully_shard(sub)
                return fully_shard(module)
            return self.accelerator.prepare_model(module)
        if self.strategy == "deepspeed":
            import deepspeed

            config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            for key in ("optimizer", "scheduler"):
                config.pop(key, None)
            zero = config.setdefault("zero_optimization", {})
            zero.pop("offload_optimizer", None)
            if zero.get("stage") != 3:
                zero["stage"] = 0
            engine, *_ = deepspeed.initialize(model=module, config=config)
            return engine.eval()
        return module

    def clip_grad_norm(self, module, max_grad_norm: float) -> float:
        """Clip the global gradient norm (when max_grad_norm > 0) and return the norm before clipping."""
        params = [p for p in module.parameters() if p.grad is not None]
        if max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(params, max_grad_norm)
            return 0.0 if norm is None else float(norm)  # None: DeepSpeed clips inside its own step
        if not params:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])))

    def full_state_dict(self, module) -> dict | None:
        """The wrapped module's whole model state dict, gathered from its shards (FSDP, ZeRO-3); every process must
        call this. None where the model holds its own weights whole."""
        if not self.sharded:
            return None
        state = self.accelerator.get_state_dict(module)
        return {key.removeprefix("model."): value for key, value in state.items()} if state else state


def start(cfg: Config) -> Runtime:
    """The accelerator with the config's mixed precision, and the strategy it was launched with. What a strategy
    cannot run is refused in one line; none silently becomes another."""
    accelerator = _accelerator(cfg.precision)
    kind = accelerator.distributed_type
    if kind.name in ("NO", "FSDP", "DEEPSPEED") or kind.name.startswith("MULTI_"):
        strategy = {"NO": "single", "FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(kind.name, "ddp")
    else:
        raise UserError(f"accelerate's {kind.value} launch is not supported; use DDP, FSDP or DeepSpeed "
                        "(configs/accelerate/)", exit_code=2)
    runtime = Runtime(accelerator, Processes.current(), strategy)
    if runtime.sharded:
        for flag, value in (("--save_steps", cfg.save_steps), ("--resume", cfg.resume), ("--lora_r", cfg.lora_r),
                            ("--adapter", cfg.adapter), ("--ref_sync_steps", cfg.ref_sync_steps)):
            if value:
                raise UserError(f"{flag}: not supported under {kind.value} yet (checkpoints, LoRA and TR-DPO run "
                                "with DDP or one process)", exit_code=2)
    if strategy == "deepspeed":
        share = cfg.batch_size // accelerator.num_processes
        if cfg.micro_batch_size and cfg.micro_batch_size != share:
            raise UserError(f"--micro_batch_size {cfg.micro_batch_size}: DeepSpeed steps its optimizer at every "
                            f"backward, so a process takes its whole share ({share}) at once here", exit_code=2)
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = share  # no data loader is prepared, so accelerate cannot infer it
        ds["gradient_clipping"] = cfg.max_grad_norm  # DeepSpeed clips inside its step (0: no clipping)
    return runtime


def _accelerator(precision: str):
    """An Accelerator with this mixed precision. accelerate keeps one process-wide state; a library user who
    trains twice with different precisions gets its precision part reset (the process group stays)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision: fp16 autocast needs a CUDA GPU; on CPU use --precision bf16 (or fp32)",
                        exit_code=2)
    # DDP need not broadcast buffers (rotary tables and the like are constants): without that broadcast a forward
    # involves no other process, so processes may run different numbers of no-grad forwards (eval shards)
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    world, device = int(os.environ.get("WORLD_SIZE", "1")), _has_accelerator_device()
    if world > 1 and not device and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise UserError("FSDP: accelerate runs FSDP on GPUs only; on CPU use configs/accelerate/ddp.yaml (or torchrun)",
                        exit_code=2)
    # under a bare `torchrun` accelerate treats several processes without a GPU as one unless told they are CPU
    # processes
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    kwargs = dict(mixed_precision=mixed, kwargs_handlers=handlers, cpu=world > 1 and not device)
    try:
        accelerator = Accelerator(**kwargs)
    except ValueError:
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != world:  # they would each train alone and overwrite each other's output
        raise UserError(f"{world} processes were launched but accelerate set up {accelerator.num_processes} "
                        f"({accelerator.distributed_type.value}); launch with torchrun or a config of "
                        "configs/accelerate/", exit_code=2)
    return accelerator


def _has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()
