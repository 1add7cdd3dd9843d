"""Where a run executes: the accelerator (device, mixed precision), the data-parallel processes, and the strategy
(one process, DDP, FSDP, DeepSpeed) with what each one needs done differently.

In a single process every collective is the identity; under `torchrun` / `accelerate launch` they use the process
group accelerate initialised (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import warnings
from dataclasses import dataclass, field

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
    fsdp_options: dict = field(default_factory=dict)  # under FSDP: reshard_after_forward

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
        """The training module and optimizer wrapped for the strategy (DDP / FSDP / DeepSpeed act in its forward).
        FSDP2 is applied here, not by accelerate (which runs it on GPUs only): the same code on CPU (gloo) and GPUs
        (NCCL)."""
        if self.strategy == "fsdp":
            module, optimizer = self._fully_shard(module, optimizer)
            local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in module.parameters())
            total = sum(p.numel() for p in module.parameters())
            self.log(f"fastdpo: FSDP2 over {self.processes.world} processes: the weights, gradients and optimizer "
                     f"state are sharded ({local / total:.1%} of the {total:,} weights on the main process)")
            return module, optimizer
        with warnings.catch_warnings():  # torch >= 2.10 renames DDP's broadcast_buffers; accelerate passes the old one
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
            return self.accelerator.prepare(module, optimizer)

    def _fully_shard(self, module, optimizer=None):
        """FSDP2 in place: a unit per decoder layer (the model's `_no_split_modules`) plus the root, which holds the
        rest (embeddings, final norm, lm_head). The weights stay float32, sharded, and are gathered whole for a
        layer's forward; `--precision bf16` computes under autocast as in one process, so the policy and its
        reference see the same numerics and the log-probs come out in float32 (a bf16 `MixedPrecisionPolicy`
        would round the summed log-probs to bf16). `optimizer`, built over the unsharded parameters, gets the
        sharded ones in their place (it has taken no step yet)."""
        from torch.distributed.fsdp import fully_shard

        names = {id(p): name for name, p in module.named_parameters()}
        layers = set(self.fsdp_options.get("layers") or module._no_split_modules or ())
        reshard = self.fsdp_options["reshard_after_forward"]
        for sub in reversed(list(module.modules())):  # inner units first, should layer classes nest
            if type(sub).__name__ in layers:
                fully_shard(sub, reshard_after_forward=reshard)
        fully_shard(module, reshard_after_forward=reshard)
        if optimizer is not None:
            sharded = dict(module.named_parameters())
            for group in optimizer.param_groups:
                group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        return module, optimizer

    def no_sync(self, module, last_micro_batch: bool):
        """Where a micro-batch's gradients wait for the step's last (DDP); FSDP reduce-scatters every micro-batch,
        which keeps only the sharded gradients."""
        if last_micro_batch or self.strategy == "fsdp":
            return contextlib.nullcontext()
        return self.accelerator.no_sync(module)

    def shard_frozen(self, module):
        """A frozen module (a reference model's) placed like the policy, without an optimizer: FSDP shards it too
        and DeepSpeed ZeRO-3 runs it as an inference engine (other ZeRO stages hold it whole). DDP has nothing to
        synchronise in a frozen model, so there and in one process it stays as it is."""
        if self.strategy == "fsdp":
            return self._fully_shard(module)[0]
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
        if self.strategy == "fsdp":  # the gradients are DTensor shards: torch's clip reduces their norm
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
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
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            state = state if self.main else None
        else:
            state = self.accelerator.get_state_dict(module)
        return {key.removeprefix("model."): value for key, value in state.items()} if state else state


def start(cfg: Config) -> Runtime:
    """The accelerator with the config's mixed precision, and the strategy it was launched with. What a strategy
    cannot run is refused in one line; none silently becomes another."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = launch_strategy(cfg, world)
    accelerator = _accelerator(cfg.precision, hide_fsdp=wanted == "fsdp" or launched() == "fsdp")
    kind = accelerator.distributed_type
    if wanted == "deepspeed" and kind.name != "DEEPSPEED":
        raise UserError("DeepSpeed: accelerate runs DeepSpeed on GPUs only, so on CPU these processes would train "
                        "with DDP instead; use configs/accelerate/ddp.yaml or fsdp.yaml (or --strategy fsdp)",
                        exit_code=2)
    if kind.name in ("NO", "DEEPSPEED") or kind.name.startswith("MULTI_"):
        strategy = {"NO": "single", "DEEPSPEED": "deepspeed"}.get(kind.name, "ddp")
    else:
        raise UserError(f"accelerate's {kind.value} launch is not supported; use DDP, FSDP or DeepSpeed "
                        "(configs/accelerate/)", exit_code=2)
    if wanted == "fsdp":
        strategy = "fsdp"
        if cfg.precision == "fp16":  # the raw optimizer would need the grad scaler's unscale and inf checks by hand
            raise UserError("--precision fp16: not supported under FSDP yet; use --precision bf16", exit_code=2)
    if world == 1 and cfg.strategy != "auto" and Processes.current().main:
        print(f"fastdpo: --strategy {cfg.strategy}: one process holds the whole model; launch 2 or more (torchrun "
              "--nproc_per_node N, or accelerate launch) to share the work", file=sys.stderr)
    runtime = Runtime(accelerator, Processes.current(), strategy, fsdp_options() if strategy == "fsdp" else {})
    if runtime.sharded:
        checkpoints = strategy == "deepspeed"  # FSDP writes sharded checkpoints
        for flag, value in (("--save_steps", checkpoints and cfg.save_steps), ("--resume", checkpoints and cfg.resume),
                            ("--lora_r", cfg.lora_r), ("--adapter", cfg.adapter),
                            ("--ref_sync_steps", cfg.ref_sync_steps)):
            if value:
                name = "FSDP" if strategy == "fsdp" else "DeepSpeed"
                what = "LoRA and TR-DPO run" if strategy == "fsdp" else "checkpoints, LoRA and TR-DPO run"
                raise UserError(f"{flag}: not supported under {name} yet ({what} with DDP or one process)",
                                exit_code=2)
    if strategy == "deepspeed":
        share = cfg.batch_size // accelerator.num_processes
        if cfg.micro_batch_size and cfg.micro_batch_size != share:
            raise UserError(f"--micro_batch_size {cfg.micro_batch_size}: DeepSpeed steps its optimizer at every "
                            f"backward, so a process takes its whole share ({share}) at once here", exit_code=2)
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = share  # no data loader is prepared, so accelerate cannot infer it
        ds["gradient_clipping"] = cfg.max_grad_norm  # DeepSpeed clips inside its step (0: no clipping)
    return runtime


def launch_strategy(cfg: Config, world: int) -> str:
    """The strategy asked for: `--strategy`, or with `auto` the accelerate config the processes were launched
    with (`accelerate launch` passes it in the environment): "single", "ddp", "fsdp" or "deepspeed"."""
    launcher = launched()
    if world == 1:
        return "single"
    if cfg.strategy == "auto":
        return launcher or "ddp"
    if launcher and launcher != cfg.strategy:
        raise UserError(f"--strategy {cfg.strategy}: the processes were launched with an accelerate config for "
                        f"{'FSDP' if launcher == 'fsdp' else 'DeepSpeed'}; drop the flag or launch with "
                        f"configs/accelerate/{cfg.strategy}.yaml", exit_code=2)
    return cfg.strategy


def launched() -> str | None:
    """The strategy `accelerate launch` passed in the environment: "fsdp", "deepspeed" or None."""
    env = lambda name: os.environ.get(name, "false").lower() == "true"  # noqa: E731
    return "fsdp" if env("ACCELERATE_USE_FSDP") else "deepspeed" if env("ACCELERATE_USE_DEEPSPEED") else None


def fsdp_options() -> dict:
    """The FSDP settings of the accelerate config (its `fsdp_config`, passed in the environment), as FSDP2 takes
    them; settings fastdpo does not apply are refused rather than ignored."""
    env = lambda name, default="": os.environ.get(name, default).strip().lower()  # noqa: E731

    def switch(name: str, default: bool) -> bool:
        value = env(name, str(default))
        if value in ("true", "1", "yes", "on"):
            return True
        if value in ("false", "0", "no", "off"):
            return False
        raise UserError(f"fsdp_config: {name.removeprefix('FSDP_').lower()}: {value!r} is not true or false",
                        exit_code=2)

    def refuse(setting: str, why: str):
        raise UserError(f"fsdp_config: {setting} is not supported yet; {why}", exit_code=2)

    if env("FSDP_VERSION", "2") != "2":
        refuse("fsdp_version 1", "fastdpo shards with FSDP2 (fsdp_version: 2, as configs/accelerate/fsdp.yaml)")
    if switch("FSDP_OFFLOAD_PARAMS", False):
        refuse("fsdp_offload_params", "set it to false")
    if switch("FSDP_CPU_RAM_EFFICIENT_LOADING", False):
        refuse("fsdp_cpu_ram_efficient_loading", "set it to false (every process loads the model, then shards it)")
    if switch("FSDP_ACTIVATION_CHECKPOINTING", False):
        refuse("fsdp_activation_checkpointing", "set it to false and pass --gradient_checkpointing true")
    if env("FSDP_SHARDING_STRATEGY", "full_shard") not in ("full_shard", "1"):
        refuse(f"fsdp_sharding_strategy {env('FSDP_SHARDING_STRATEGY').upper()}", "fastdpo shards fully (FULL_SHARD)")
    if env("FSDP_AUTO_WRAP_POLICY", "transformer_based_wrap") not in ("transformer_based_wrap", ""):
        refuse(f"fsdp_auto_wrap_policy {env('FSDP_AUTO_WRAP_POLICY').upper()}",
               "fastdpo wraps each decoder layer (TRANSFORMER_BASED_WRAP)")
    if env("FSDP_IGNORED_MODULES"):
        refuse("fsdp_ignored_modules", "remove it")
    layers = [name.strip() for name in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if name.strip()]
    return {"reshard_after_forward": switch("FSDP_RESHARD_AFTER_FORWARD", True), "layers": layers or None}


def _accelerator(precision: str, hide_fsdp: bool = False):
    """An Accelerator with this mixed precision. accelerate keeps one process-wide state; a library user who
    trains twice with different precisions gets its precision part reset (the process group stays). With
    `hide_fsdp` accelerate sets up plain data-parallel processes and fastdpo applies FSDP2 itself (accelerate
    would refuse it on CPU)."""
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
    # under a bare `torchrun` accelerate treats several processes without a GPU as one unless told they are CPU
    # processes
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    kwargs = dict(mixed_precision=mixed, kwargs_handlers=handlers, cpu=world > 1 and not device)
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None) if hide_fsdp else None
    try:
        try:
            accelerator = Accelerator(**kwargs)
        except ValueError:
            AcceleratorState._reset_state(reset_partial_state=False)
            accelerator = Accelerator(**kwargs)
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved
    if accelerator.num_processes != world:  # they would each train alone and overwrite each other's output
        raise UserError(f"{world} processes were launched but accelerate set up {accelerator.num_processes} "
                        f"({accelerator.distributed_type.value}); launch with torchrun or a config of "
                        "configs/accelerate/", exit_code=2)
    return accelerator


def _has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()
