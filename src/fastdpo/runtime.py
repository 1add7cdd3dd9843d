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
import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fastdpo.config import Config
from fastdpo.errors import UserError
from fastdpo.head import chunked_logps


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
    options: dict = field(default_factory=dict)  # FSDP: reshard_after_forward, layers; DeepSpeed: its config
    weights_on_main: bool = False  # only the main process reads the weights (see `start`)
    reference_dtype: object = None  # a frozen reference model's matmul weights' dtype (see `start`), None: its own
    _mesh: object = field(default=None, init=False, repr=False)  # FSDP's device mesh, made once

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
        return self.strategy == "deepspeed" and self.options["zero_optimization"]["stage"] == 3

    def on_main(self, work):
        """`work()` on the main process, its result on every process. A failure there stops the others too, with
        one line (they would otherwise wait for the result for ever)."""
        result = failure = None
        if self.main:
            try:
                result = work()
            except Exception as e:
                failure = e
        summary = None if failure is None else (str(failure) if isinstance(failure, UserError) else
                                                f"{type(failure).__name__}: {str(failure)[:200]}")
        result, summary = self.processes.gather((result, summary))[0]
        if failure is not None:
            raise failure
        if summary is not None:
            raise UserError(f"stopped because the main process failed: {summary}")
        return result

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
            hybrid = self.options.get("mesh")
            how = f"HSDP ({hybrid[0]} replicas, each sharded over {hybrid[1]} processes)" if hybrid else "FSDP2"
            self.log(f"fastdpo: {how} over {self.processes.world} processes: the weights, gradients and optimizer "
                     f"state are sharded ({local / total:.1%} of the {total:,} weights on the main process)")
            return module, optimizer
        if self.strategy == "deepspeed":
            return self._deepspeed(module, optimizer)
        with warnings.catch_warnings():  # torch >= 2.10 renames DDP's broadcast_buffers; accelerate passes the old one
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
            return self.accelerator.prepare(module, optimizer)

    def _fully_shard(self, module, optimizer=None):
        """FSDP2 in place: a unit per decoder layer (the model's `_no_split_modules`, or the classes the accelerate
        config lists) plus the root, which holds the rest (embeddings, final norm, and the lm_head unless its class
        is listed). The weights keep their dtype, sharded, and are gathered whole for a layer's forward;
        `--precision bf16` computes under autocast as in one process, so the policy and its reference see the same
        numerics and the log-probs come out in float32 (a bf16 `MixedPrecisionPolicy` would round the summed
        log-probs to bf16). A frozen reference that holds its matmul weights in bf16 (`models.hold_matmul_weights_in`)
        is sharded as it is: FSDP2 gathers a frozen unit's parameters of several dtypes together. `optimizer`, built
        over the unsharded parameters, gets the sharded ones in their place (it has taken no step yet)."""
        from torch.distributed.fsdp import fully_shard

        names = {id(p): name for name, p in module.named_parameters()}
        layers = set(self.options.get("layers") or module._no_split_modules or ())
        reshard = self.options["reshard_after_forward"]
        head = module.model.get_output_embeddings() if hasattr(module.model, "get_output_embeddings") else None
        own_head = head is not None and type(head).__name__ in layers  # the lm_head a unit of its own
        inputs = module.model.get_input_embeddings() if own_head else None
        if own_head and inputs is not None and inputs.weight is head.weight:
            raise UserError(f"fsdp_transformer_layer_cls_to_wrap: {type(head).__name__} would make the lm_head a unit "
                            "of its own, but its weight is tied to the input embeddings, which sit in another unit: "
                            "list the decoder layer classes only "
                            f"({', '.join(module._no_split_modules or [])})", exit_code=2)
        full = module.state_dict() if self.weights_on_main and self.main else None  # the weights the others get
        mesh = self.device_mesh()
        for sub in reversed(list(module.modules())):  # inner units first, should layer classes nest
            if type(sub).__name__ in layers:
                fully_shard(sub, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
        if own_head:  # the chunked head reads the lm_head's weight: FSDP gathers it for this method as for forward
            from torch.distributed.fsdp import register_fsdp_forward_method

            head.chunked_logps = types.MethodType(chunked_logps, head)
            register_fsdp_forward_method(head, "chunked_logps")
        if self.weights_on_main:
            self._receive_weights(module, full)
        _replace_params(optimizer, names, module)
        return module, optimizer

    def device_mesh(self):
        """FSDP's processes: None for full sharding over all of them (FSDP's default mesh); for hybrid sharding
        (HSDP) a 2-D mesh whose rows replicate and whose columns shard (a machine's processes shard the weights,
        the machines each hold a replica and all-reduce the gradients)."""
        if self._mesh is None and self.options.get("mesh"):
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, tuple(self.options["mesh"]),
                                          mesh_dim_names=("replicate", "shard"))
        return self._mesh

    def _receive_weights(self, module, full: dict | None) -> None:
        """The main process's weights (`full`, its whole state dict; None on the others) into every process's
        shards of the sharded `module`, whose parameters are on the meta device on the other processes; its
        buffers (rotary tables and the like, some not in the state dict) are broadcast whole."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if not self.main:
            module.to_empty(device=self.device)
        set_model_state_dict(module, full or {}, options=StateDictOptions(full_state_dict=True,
                                                                           broadcast_from_rank0=True))
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

    def _deepspeed(self, module, optimizer=None):
        """A DeepSpeed engine around `module` (ZeRO-2: gradients and optimizer state sharded; ZeRO-3: the weights
        too), applied here, not by accelerate (which runs it on GPUs only). Without `optimizer`: an inference engine
        (a frozen ZeRO-3 reference). The weights are float32 and `--precision bf16` runs under autocast, as in one
        process; the engine reduce-scatters each micro-batch's gradients into its partition as they arrive
        (ZeRO-2 and 3) and steps once, at `step`."""
        import deepspeed

        config = copy.deepcopy(self.options)
        if optimizer is None:  # frozen: no optimizer state
            config["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items()
                                           if not k.startswith("offload_optimizer")}
        hidden = getattr(module.model.config.get_text_config(), "hidden_size", None)
        if isinstance(hidden, int):  # sized to the model as Hugging Face's "auto" does; DeepSpeed's own are GPU-sized
            for key, value in (("reduce_bucket_size", hidden * hidden),
                               ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                               ("stage3_param_persistence_threshold", 10 * hidden)):
                config["zero_optimization"].setdefault(key, value)
        if config["zero_optimization"]["stage"] == 3 and self.weights_on_main:
            names = {id(p): name for name, p in module.named_parameters()}
            self._partition_from_main(module, config)
            _replace_params(optimizer, names, module)  # the other processes' meta parameters were replaced
        if config["zero_optimization"]["stage"] == 3 and module.layout.head == "chunked":
            # the chunked head reads the lm_head's weight in this module's forward, not in the lm_head's own
            for param in module.model.get_output_embeddings().parameters():
                deepspeed.zero.register_external_parameter(module, param)
        engine, ds_optimizer, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                                        dist_init_required=False)
        if optimizer is None:
            engine.eval()  # (DeepSpeed's eval returns None)
            return engine
        self.log(f"fastdpo: DeepSpeed ZeRO-{config['zero_optimization']['stage']} over {self.processes.world} "
                 f"processes: " + ("the weights, gradients and optimizer state are sharded" if self.zero3 else
                                   "gradients and optimizer state sharded, every process holds the weights"))
        return engine, EngineOptimizer(engine)

    def _partition_from_main(self, module, config: dict) -> None:
        """`module`'s ZeRO-3 partitions from the main process's weights, where the other processes hold it on the
        meta device: a module's own parameters at a time are made real on this device (on any process at most
        one layer's weights beyond its partitions), DeepSpeed broadcasts them from the main process as it converts
        them and keeps each process's partition. Buffers (rotary tables and the like) are broadcast whole. What
        `deepspeed.initialize` finds already partitioned it keeps."""
        from deepspeed.runtime.zero.partition_parameters import Init, is_zero_param

        real: dict[int, torch.Tensor] = {}  # a meta tensor's id -> its replacement (a tied weight is replaced once)
        convert = None
        for sub in module.modules():
            for name, buffer in sub._buffers.items():
                if buffer is not None:
                    if id(buffer) not in real:
                        real[id(buffer)] = torch.empty_like(buffer, device=self.device) if buffer.is_meta \
                            else buffer.to(self.device)
                        dist.broadcast(real[id(buffer)], src=0)
                    sub._buffers[name] = real[id(buffer)]
            own = []
            for name, param in sub._parameters.items():
                if param is None or is_zero_param(param):  # (a tied weight is converted with its first module)
                    continue
                if param.is_meta:
                    if id(param) not in real:
                        real[id(param)] = torch.nn.Parameter(torch.empty_like(param, device=self.device),
                                                             requires_grad=param.requires_grad)
                    param = sub._parameters[name] = real[id(param)]
                own.append(param)
            if own and convert is None:
                Init(module=torch.nn.ParameterList(own), config_dict_or_path=config, dtype=torch.float32)
                convert = own[0].convert_to_zero_parameters
            elif own:
                convert(param_list=own)

    def backward(self, module, loss) -> None:
        if self.strategy == "deepspeed":  # the loss is already scaled for the micro-batches of the step
            module.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def no_sync(self, module, last_micro_batch: bool):
        """Where a micro-batch's gradients wait for the step's last (DDP); FSDP reduce-scatters every micro-batch,
        which keeps only the sharded gradients."""
        if last_micro_batch or self.strategy in ("fsdp", "deepspeed"):  # DeepSpeed accumulates in its partitions
            return contextlib.nullcontext()
        return self.accelerator.no_sync(module)

    def shard_frozen(self, module):
        """A frozen module (a reference model's) placed like the policy, without an optimizer: FSDP shards it too
        and DeepSpeed ZeRO-3 runs it as an inference engine (other ZeRO stages hold it whole). DDP has nothing to
        synchronise in a frozen model, so there and in one process it stays as it is."""
        if self.strategy == "fsdp":
            return self._fully_shard(module)[0]
        if self.zero3:
            return self._deepspeed(module)
        return module

    def clip_grad_norm(self, module, max_grad_norm: float) -> float | None:
        """Clip the global gradient norm (when max_grad_norm > 0) and return the norm before clipping; None under
        DeepSpeed, which clips inside its step (`EngineOptimizer.grad_norm` has it afterwards)."""
        if self.strategy == "deepspeed":
            return None
        params = [p for p in module.parameters() if p.grad is not None]
        if self.strategy == "fsdp":  # the gradients are DTensor shards: torch's clip reduces their norm
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if max_grad_norm > 0:
            return float(self.accelerator.clip_grad_norm_(params, max_grad_norm))
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
            state = _tied(module, state) if self.main else None
        elif self.zero3:
            state = module._zero3_consolidated_16bit_state_dict()  # layer by layer onto the main process, any dtype
        else:  # ZeRO-2: every process holds the weights whole
            return None
        return {key.removeprefix("model."): value for key, value in state.items()} if state else state


def _tied(module, state: dict) -> dict:
    """`state` with the names of one shared parameter (tied embeddings) on one tensor, as the model holds them,
    so that `save_pretrained` saves it once (the gathered state dict has a copy per name)."""
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for first, *others in names.values():
        for other in others:
            if first in state and other in state:
                state[other] = state[first]
    return state


class EngineOptimizer:
    """The optimizer as the training loop drives it under DeepSpeed: the engine's `step` reduces the accumulated
    gradients, clips them, steps the wrapped AdamW and zeroes the gradients. The learning-rate schedule acts on
    the AdamW's parameter groups, which the engine's optimizer shares."""

    def __init__(self, engine):
        self.engine, self.stepped = engine, False
        self.grad_norm = math.nan  # the global gradient norm before clipping, of the last step (NaN: skipped)
        self.applied = True  # whether the last step changed the weights (DeepSpeed skips non-finite gradients)

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups

    def step(self) -> None:
        self.engine.step()
        self.stepped = True
        norm = self.engine.get_global_grad_norm()
        self.grad_norm = math.nan if norm is None else float(norm)
        self.applied = self.engine.was_step_applied()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """After a step the engine has zeroed them; a skipped step's gradients are reduced into the partitions,
        then dropped (the partitions too, where ZeRO-2 accumulates them apart from the weights' gradients)."""
        if not self.stepped:
            optimizer = self.engine.optimizer
            optimizer.finalize_gradient_accumulation_boundary()
            optimizer.zero_grad(set_to_none=set_to_none)
            averaged = getattr(optimizer, "averaged_gradients", None)
            for key in list(averaged) if isinstance(averaged, dict) else []:
                averaged[key] = None
            self.grad_norm, self.applied = math.nan, False
        self.stepped = False


def start(cfg: Config) -> Runtime:
    """The accelerator with the config's mixed precision, and the strategy it was launched with. What a strategy
    cannot run is refused in one line; none silently becomes another. accelerate sets up plain data-parallel
    processes (on CPU and on GPUs); fastdpo applies FSDP2 and DeepSpeed itself, the same way on both."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = launch_strategy(cfg, world)
    accelerator = _accelerator(cfg.precision)
    kind = accelerator.distributed_type
    if not (kind.name == "NO" or kind.name.startswith("MULTI_")):
        raise UserError(f"accelerate's {kind.value} launch is not supported; use DDP, FSDP or DeepSpeed "
                        "(configs/accelerate/)", exit_code=2)
    strategy = {"zero2": "deepspeed", "zero3": "deepspeed", "hsdp": "fsdp"}.get(wanted, wanted)
    name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}.get(strategy)
    if name and cfg.precision == "fp16":  # the raw optimizer would need the grad scaler's unscale and inf checks
        raise UserError(f"--precision fp16: not supported under {name} yet; use --precision bf16", exit_code=2)
    if world == 1 and cfg.strategy != "auto" and Processes.current().main:
        print(f"fastdpo: --strategy {cfg.strategy}: one process holds the whole model; launch 2 or more (torchrun "
              "--nproc_per_node N, or accelerate launch) to share the work", file=sys.stderr)
    if name:
        for flag, value in (("--lora_r", cfg.lora_r), ("--adapter", cfg.adapter),
                            ("--ref_sync_steps", cfg.ref_sync_steps)):
            if value:
                raise UserError(f"{flag}: not supported under {name} yet (LoRA and TR-DPO run with DDP or one "
                                "process)", exit_code=2)
    options = {}
    if strategy == "fsdp":
        options = fsdp_options(world, hybrid=wanted == "hsdp")
    elif strategy == "deepspeed":
        share = cfg.batch_size // world
        options = deepspeed_options(cfg, int(wanted[-1]), min(cfg.micro_batch_size or share, share))
    # FSDP and ZeRO-3 over several processes: only the main process reads the weights; the others build the model
    # on the meta device and receive their shards as it is sharded (`_fully_shard`, `_partition_from_main`). A
    # precomputed reference is computed by the sharded model (`reference.placed`).
    on_main = (strategy == "fsdp" or options.get("zero_optimization", {}).get("stage") == 3) and world > 1
    # Under bf16 / fp16 autocast a frozen reference model holds its matmul weights in that dtype, which autocast
    # casts them to at every forward anyway (`models.hold_matmul_weights_in`), sharded as it is under FSDP and
    # ZeRO-3. Not for TR-DPO, whose reference moves by small steps.
    frozen = not cfg.ref_sync_steps
    reference_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if frozen else None
    return Runtime(accelerator, Processes.current(), strategy, options, on_main, reference_dtype)


def launch_strategy(cfg: Config, world: int) -> str:
    """The strategy asked for: `--strategy`, or with `auto` the accelerate config the processes were launched
    with (`accelerate launch` passes it in the environment): "single", "ddp", "fsdp", "zero2" or "zero3"."""
    launcher = launched()
    if world == 1:
        return "single"
    if cfg.strategy == "auto":
        return launcher or "ddp"
    if launcher and launcher != cfg.strategy:
        names = {"fsdp": "FSDP", "hsdp": "hybrid FSDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}
        config = {"zero2": "deepspeed-zero2", "zero3": "deepspeed-zero3", "hsdp": "fsdp"}.get(cfg.strategy,
                                                                                               cfg.strategy)
        raise UserError(f"--strategy {cfg.strategy}: the processes were launched with an accelerate config for "
                        f"{names[launcher]}; drop the flag or launch with configs/accelerate/{config}.yaml",
                        exit_code=2)
    return cfg.strategy


def launched() -> str | None:
    """The strategy `accelerate launch` passed in the environment: "fsdp", "zero2", "zero3" or None."""
    env = lambda name: os.environ.get(name, "false").lower() == "true"  # noqa: E731
    if env("ACCELERATE_USE_FSDP"):
        hybrid = os.environ.get("FSDP_SHARDING_STRATEGY", "").strip().upper() in ("HYBRID_SHARD", "4") or (
            env("ACCELERATE_USE_PARALLELISM_CONFIG") and int(os.environ.get("PARALLELISM_CONFIG_DP_REPLICATE_SIZE",
                                                                            "1")) > 1)
        return "hsdp" if hybrid else "fsdp"
    if env("ACCELERATE_USE_DEEPSPEED"):
        return f"zero{deepspeed_file_and_stage()[1]}"
    return None


def deepspeed_file_and_stage() -> tuple[dict, int]:
    """The DeepSpeed config file accelerate's config names (`deepspeed_config_file`, as a dict; {} without one)
    and the ZeRO stage it or the config's `zero_stage` asks for."""
    import json

    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    config = {}
    if path.lower() != "none":
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"deepspeed_config_file: {path}: could not read it as JSON ({e})", exit_code=2) from None
    stage = config.get("zero_optimization", {}).get("stage", os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
    if str(stage) not in ("2", "3"):
        raise UserError(f"DeepSpeed zero_stage {stage}: fastdpo runs ZeRO stages 2 and 3 (configs/accelerate/"
                        "deepspeed-zero2.yaml, deepspeed-zero3.yaml); for no sharding launch with ddp.yaml",
                        exit_code=2)
    return config, int(stage)


def deepspeed_options(cfg: Config, stage: int, micro: int) -> dict:
    """The DeepSpeed config fastdpo runs: ZeRO `stage`, the accelerate config's ZeRO settings, micro-batches of
    `micro` pairs accumulated by the engine until fastdpo's step, clipping at --max_grad_norm. What fastdpo decides
    itself (optimizer, schedule, precision, batch sizes) or does not run yet is refused rather than ignored."""
    try:
        import deepspeed.runtime.engine as ds_engine
    except ImportError as e:
        raise UserError(f"DeepSpeed is not installed ({e}): pip install deepspeed, or launch with "
                        "configs/accelerate/fsdp.yaml (--strategy fsdp)", exit_code=2) from None

    if not hasattr(ds_engine.DeepSpeedEngine, "managed_gradient_accumulation"):
        raise UserError("DeepSpeed is too old for fastdpo (it needs managed_gradient_accumulation, DeepSpeed >= "
                        "0.18): pip install -U deepspeed", exit_code=2)
    from_file, _ = deepspeed_file_and_stage() if launched() else ({}, stage)
    env = lambda name, default="none": os.environ.get(name, default).strip().lower()  # noqa: E731

    def refuse(setting: str, why: str):
        raise UserError(f"DeepSpeed {setting} is not supported; {why}", exit_code=2)

    for key, flag in (("optimizer", "--learning_rate, --adam_* and --weight_decay"),
                      ("scheduler", "--lr_scheduler and --warmup_steps"), ("fp16", "--precision"),
                      ("bf16", "--precision"), ("train_batch_size", "--batch_size"),
                      ("train_micro_batch_size_per_gpu", "--micro_batch_size"),
                      ("gradient_accumulation_steps", "--batch_size and --micro_batch_size")):
        value = from_file.get(key)
        if value not in (None, "auto") and not (isinstance(value, dict) and value.get("enabled") in (False, "auto")):
            refuse(f"{key} (in deepspeed_config_file)", f"fastdpo sets it from {flag}; remove it or write \"auto\"")
    if env("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1") not in ("1", "auto"):
        refuse("gradient_accumulation_steps > 1", "accumulation follows from --batch_size and --micro_batch_size")
    clipping = from_file.get("gradient_clipping", env("ACCELERATE_GRADIENT_CLIPPING", "auto"))
    if str(clipping) not in ("auto", "none") and float(clipping) != cfg.max_grad_norm:
        refuse(f"gradient_clipping {clipping}", f"fastdpo clips at --max_grad_norm ({cfg.max_grad_norm}); pass "
               f"--max_grad_norm {clipping} or remove it from the config")
    zero = dict(from_file.get("zero_optimization", {}), stage=stage)
    for part in ("optimizer", "param"):
        default = env(f"ACCELERATE_DEEPSPEED_OFFLOAD_{part.upper()}_DEVICE")
        device = zero.get(f"offload_{part}", {}).get("device", default)
        if str(device).lower() not in ("none", ""):
            refuse(f"offload_{part}_device {device}", "set it to none")
    # zero3_init_flag (the model partitioned as it is built) is what fastdpo does under ZeRO-3 either way: the main
    # process reads the weights and the others receive their partitions (`Runtime._partition_from_main`)
    rest = {k: v for k, v in from_file.items() if k not in ("zero_optimization", "gradient_clipping") and v != "auto"}
    return {**rest, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False, "gradient_clipping": cfg.max_grad_norm,
            "zero_optimization": {k: v for k, v in zero.items() if v != "auto"},
            "zero_allow_untested_optimizer": True, "steps_per_print": 2**62}


def fsdp_options(world: int, hybrid: bool = False) -> dict:
    """The FSDP settings of the accelerate config (its `fsdp_config`, passed in the environment), as FSDP2 takes
    them; settings fastdpo does not apply are refused rather than ignored. `hybrid`: HSDP, each machine's
    processes sharding one replica (or the accelerate config's `parallelism_config` sizes)."""
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
    if switch("FSDP_ACTIVATION_CHECKPOINTING", False):
        refuse("fsdp_activation_checkpointing", "set it to false and pass --gradient_checkpointing true")
    if env("FSDP_SHARDING_STRATEGY", "full_shard") not in ("full_shard", "1", "hybrid_shard", "4"):
        refuse(f"fsdp_sharding_strategy {env('FSDP_SHARDING_STRATEGY').upper()}",
               "fastdpo shards fully (FULL_SHARD) or within each machine (HYBRID_SHARD)")
    sizes = {key: int(os.environ.get(f"PARALLELISM_CONFIG_{key.upper()}_SIZE", "1") or 1)
             for key in ("dp_replicate", "dp_shard", "tp", "cp", "sp")} if switch("ACCELERATE_USE_PARALLELISM_CONFIG",
                                                                                 False) else {}
    for key in ("tp", "cp", "sp"):
        if sizes.get(key, 1) > 1:
            refuse(f"parallelism_config_{key}_size {sizes[key]}", "fastdpo shards data-parallel only")
    replicas = sizes.get("dp_replicate", 1)
    if hybrid and replicas == 1:  # HYBRID_SHARD: the machines replicate, a machine's processes shard
        replicas = world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if replicas == 1 and int(os.environ.get("RANK", "0")) == 0:
            print("fastdpo: hybrid sharding on one machine is full sharding: FSDP2 over its processes",
                  file=sys.stderr)
    shards = sizes.get("dp_shard", 1) if sizes.get("dp_shard", 1) > 1 else world // max(replicas, 1)
    if world % replicas or replicas * shards != world:
        refuse(f"parallelism_config dp_replicate_size {replicas} x dp_shard_size {shards}",
               f"the sizes must multiply to the {world} processes")
    if env("FSDP_AUTO_WRAP_POLICY", "transformer_based_wrap") not in ("transformer_based_wrap", ""):
        refuse(f"fsdp_auto_wrap_policy {env('FSDP_AUTO_WRAP_POLICY').upper()}",
               "fastdpo wraps each decoder layer (TRANSFORMER_BASED_WRAP)")
    if env("FSDP_IGNORED_MODULES"):
        refuse("fsdp_ignored_modules", "remove it")
    layers = [name.strip() for name in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if name.strip()]
    return {"reshard_after_forward": switch("FSDP_RESHARD_AFTER_FORWARD", True), "layers": layers or None,
            "mesh": (replicas, shards) if replicas > 1 else None}


def _replace_params(optimizer, names: dict, module) -> None:
    """`optimizer` (None: nothing to do), built over parameters that `module` has replaced since (by sharded or
    materialised ones; `names`: the old ones' ids -> their names), gets the new ones in their place (it has taken
    no step yet)."""
    if optimizer is None:
        return
    params = dict(module.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [params[names[id(p)]] for p in group["params"]]


def _accelerator(precision: str):
    """An Accelerator with this mixed precision, for plain data-parallel processes: accelerate's FSDP and DeepSpeed
    switches are hidden from it (fastdpo applies both itself; accelerate runs them on GPUs only). accelerate keeps
    one process-wide state; a library user who trains twice with different precisions gets its precision part
    reset (the process group stays)."""
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
    saved = {name: os.environ.pop(name) for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
             if name in os.environ}
    try:
        try:
            accelerator = Accelerator(**kwargs)
        except ValueError:
            AcceleratorState._reset_state(reset_partial_state=False)
            accelerator = Accelerator(**kwargs)
    finally:
        os.environ.update(saved)
    if accelerator.num_processes != world:  # they would each train alone and overwrite each other's output
        raise UserError(f"{world} processes were launched but accelerate set up {accelerator.num_processes} "
                        f"({accelerator.distributed_type.value}); launch with torchrun or a config of "
                        "configs/accelerate/", exit_code=2)
    return accelerator


def _has_accelerator_device() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()
