"""`fastdpo train`: `setup` builds every piece of a run (nothing is written until it has succeeded), then `fit` runs
the one explicit training loop."""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

import torch

from fastdpo.attention import set_per_segment
from fastdpo.batching import Layout, batch_order
from fastdpo.checkpoint import (TrainerState, clean_partial_checkpoints, latest_checkpoint, load_checkpoint,
                                save_checkpoint, save_final, save_sharded_checkpoint)
from fastdpo.config import Config
from fastdpo.data import Fields
from fastdpo.errors import UserError
from fastdpo.evaluation import evaluate_pairs
from fastdpo.logps import LogpsModule, choose_layout, flex_compile_failure
from fastdpo.metrics import (LogWindow, MetricsFile, NoMetricsFile, ProgressBar, Sinks, StepRecord, mean_metrics,
                             on_host, open_trackers, tracker_dirs)
from fastdpo.outputs import Plan, atomic_write_text, claim, plan_output_dir, recorded, remove_ours, write_error
from fastdpo.models import (Inputs, attention_implementation, check_models, is_lora, load_policy, policy_tokenizer,
                            reference_weights, save_dtype, set_attention)
from fastdpo.report import model_card
from fastdpo.reference import Reference, build_reference, placed, sync_reference
from fastdpo.runtime import Processes, Runtime, start
from fastdpo.step import score_batch
from fastdpo.prepare import data_cache_dir, load_pairs
from fastdpo.tokenize import PairSet


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    eval_before: dict | None
    eval_after: dict | None
    last_metrics: dict | None  # the last metrics.jsonl training line
    stopped: bool = False  # by SIGTERM or Ctrl-C, after writing a checkpoint
    model: Any = None  # the trained policy, in memory (a peft model with LoRA); sharded: on the main process only


@dataclass
class Run:
    """Every piece `setup` built, handed to `fit`."""

    cfg: Config
    runtime: Runtime
    tokenizer: Any
    pairs: PairSet
    eval_pairs: PairSet | None
    policy: Any  # the model that trains and is saved (a peft model with LoRA)
    module: Any  # the policy's LogpsModule as the strategy wrapped it: the forward the loop runs
    layout: Layout
    reference: Reference  # for the training pairs
    eval_reference: Reference | None
    optimizer: Any
    scheduler: Any
    state: TrainerState
    plan: Plan  # what the run does with its output directory
    micro_batch_size: int  # pairs per forward pass per process
    save_dtype: Any = None  # torch dtype of the saved model's weights
    sample_prompts: list = dataclasses.field(default_factory=list)  # --eval_samples: (prompt, ids) of each

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def resume_from(self) -> str | None:
        return self.plan.resume_from


def train(cfg: Config, inputs: Inputs | None = None) -> TrainResult:
    """Fine-tune `cfg.model` (or the model in `inputs`) on `cfg.data` with DPO; see the README."""
    return fit(setup(cfg, inputs))


def fit(run: Run) -> TrainResult:
    """The loop: each step's micro-batches (forward, loss, backward), clip, optimizer step, log, eval, save."""
    cfg, rt, state, pairs = run.cfg, run.runtime, run.state, run.pairs
    if run.resume_from and state.step >= state.total_steps and recorded(cfg.output_dir)["finished"]:
        rt.log(f"fastdpo: --resume: {cfg.output_dir} is finished ({state.step} of {state.total_steps} steps); nothing to "
               "do (a larger --max_steps or --epochs trains it further)")
        return TrainResult(cfg.output_dir, state.step, state.eval_before, None, None, model=finished_model(run))
    sinks, stop = open_outputs(run), None
    try:
        if state.step == 0:
            state.eval_before = evaluate_now(run, 0, sinks)  # a Ctrl-C here interrupts (exit 130)
        if state.eval_before:
            rt.log(eval_line("eval before training", state.eval_before))
        stop = StopOnSignal().install()  # SIGTERM / first Ctrl-C: finish the step, checkpoint, exit 0
        bar = ProgressBar(state.total_steps, initial=state.step, enabled=cfg.progress, quiet=not rt.main)
        window, last, orders = LogWindow(), None, {}
        lengths = pairs.num_tokens().tolist() if cfg.group_by_length else None
        run.module.train()
        for step in range(state.step, state.total_steps):
            epoch, index = divmod(step, state.steps_per_epoch)
            if epoch not in orders:  # the data order is a function of (seed, epoch): resume needs only the step
                orders = {epoch: batch_order(len(pairs), cfg.batch_size, cfg.shuffle, cfg.seed, epoch, lengths)}
            positions = orders[epoch][index]
            micro_batches = rt.processes.micro_batches(positions, run.micro_batch_size)
            shares = step_gradients(run, micro_batches)
            grad_norm = rt.clip_grad_norm(run.module, cfg.max_grad_norm)  # None: DeepSpeed clips in its step
            lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses
            stats = gather_step(rt.processes, shares, stop.requested is not None)  # the one gather of a step
            optimizer_step(run, math.isfinite(grad_norm or 0.0) and math.isfinite(stats.metrics["loss"]))
            grad_norm = run.optimizer.grad_norm if grad_norm is None else grad_norm
            state.step = done = step + 1
            if cfg.ref_sync_steps and done % cfg.ref_sync_steps == 0:
                sync_reference(run.reference.model, run.policy, cfg.ref_sync_alpha)
            stats.metrics["skipped_steps"] = state.skipped_steps
            window.add(StepRecord(stats.metrics, grad_norm, stats.tokens, len(positions)))
            bar.update({**stats.metrics, "pairs_per_second": window.pairs_per_second()})
            if done % cfg.logging_steps == 0 or done == state.total_steps:
                last = window.flush(done, epoch + (index + 1) / state.steps_per_epoch, lr)
                sinks.write(last)
                bar.logged(last)
            if cfg.eval_steps and done % cfg.eval_steps == 0 and done != state.total_steps:
                result = evaluate_now(run, done, sinks)
                if result and rt.main:
                    bar.write(eval_line(f"step {done}: eval", result))
            stopping = stats.stop_requested and done != state.total_steps  # every process stops after this step
            # with --save_steps the last step is checkpointed too: a larger --max_steps can continue the run
            saving = (cfg.save_steps and (done % cfg.save_steps == 0 or done == state.total_steps)) or stopping
            if saving and rt.sharded:  # every process writes its shards
                save_sharded_checkpoint(cfg.output_dir, done, run.module, run.optimizer, run.scheduler,
                                        state.to_json(), rt.processes, rt.strategy, keep=cfg.save_total_limit,
                                        scaler=rt.accelerator.scaler)
            elif saving and rt.main:
                save_checkpoint(cfg.output_dir, done, run.policy, run.optimizer, run.scheduler, state.to_json(),
                                keep=cfg.save_total_limit, reference=synced_reference(run),
                                scaler=rt.accelerator.scaler)
            rt.accelerator.wait_for_everyone()
            if stopping:
                bar.close()
                rt.log(f"fastdpo: {stop.requested or 'stop'}: stopped after step {done} of {state.total_steps}; "
                       "checkpoint written, continue with the same command plus --resume")
                return TrainResult(cfg.output_dir, done, state.eval_before, None, last, True, run.policy)
        bar.close()
        eval_after = evaluate_now(run, state.total_steps, sinks)
    finally:
        if stop is not None:
            stop.uninstall()
        sinks.close()
    state_dict = rt.full_state_dict(run.module)  # every process takes part in gathering sharded weights
    trained = finished_model(run)
    if rt.main:
        results = {"steps": state.total_steps, "eval_before": state.eval_before, "eval_after": eval_after}
        card = model_card(dataclasses.asdict(cfg), results, last)
        trained = save_final(cfg.output_dir, trained, run.tokenizer, results, is_lora(trained), cfg.merge_lora,
                             state_dict, run.save_dtype, card)
        print_summary(cfg, state.eval_before, eval_after)
    if rt.strategy == "fsdp" or rt.zero3:  # the policy holds shards: a whole copy on the main process
        trained = plain_model(trained, state_dict) if rt.main else None
    rt.accelerator.wait_for_everyone()
    return TrainResult(cfg.output_dir, state.total_steps, state.eval_before, eval_after, last, model=trained)


def step_gradients(run: Run, micro_batches) -> list[ShareOfStep]:
    """Forward, loss and backward of a step's micro-batches, the gradients accumulated; each one's share of the
    step's metrics. Where torch.compile fails to build FlexAttention's backward kernel for a shape (one process),
    the step starts again from zero gradients with SDPA (`flex_compile_failure`), which gives the same numbers."""
    try:
        return _accumulate(run, micro_batches)
    except Exception as e:
        if not flex_compile_failure(run.policy.get_base_model() if is_lora(run.policy) else run.policy, e):
            raise
    run.optimizer.zero_grad(set_to_none=True)
    return _accumulate(run, micro_batches)


def _accumulate(run: Run, micro_batches) -> list[ShareOfStep]:
    rt, shares = run.runtime, []
    for k, (chunk, scale) in enumerate(micro_batches):
        chunk_pairs = [run.pairs[i] for i in chunk]
        batch = run.layout.collate(chunk_pairs, run.pad_token_id).to(rt.device)
        sync = rt.no_sync(run.module, last_micro_batch=k == len(micro_batches) - 1)
        with sync, rt.autocast():
            scored = score_batch(run.module, run.reference, batch, chunk, run.cfg)
            rt.backward(run.module, scored.losses.sum() * scale)
        if scale:  # a zero-scale micro-batch only keeps the processes in step
            shares.append(ShareOfStep(scored.metrics, sum(p.num_tokens for p in chunk_pairs), batch.padding_share))
    return shares


# --- set-up ---------------------------------------------------------------------------------------------------


def setup(cfg: Config, inputs: Inputs | None = None) -> Run:
    """Load the data and the models, choose the layout, build the reference and the optimizer, restore a checkpoint
    with --resume. Nothing is written to the output directory here."""
    from accelerate.utils import set_seed

    inputs = inputs or Inputs()
    require_inputs(cfg, inputs)
    runtime = start(cfg)
    attention = attention_implementation(cfg, runtime.device)
    if attention == "flex_attention" and runtime.device.type == "cpu":
        raise UserError("--attn_implementation flex_attention: torch has no FlexAttention backward on CPU, so "
                        "training here needs sdpa or eager (on CPU, fastdpo eval takes flex_attention)", exit_code=2)
    plan = plan_output_dir(cfg.output_dir, cfg.overwrite, cfg.resume, latest_checkpoint)
    runtime.processes.barrier()  # every process has checked the output dir before the main one writes to it
    if plan.notice:
        runtime.log(plan.notice)
    set_seed(cfg.seed)
    tokenizer = policy_tokenizer(cfg, inputs)
    cfg = check_models(cfg, inputs, tokenizer, runtime.log)  # before the heavy work; lengths the models can take
    pairs = load_set(cfg, tokenizer, inputs.data, "data", runtime)
    eval_pairs = load_set(cfg, tokenizer, inputs.eval_data, "eval_data", runtime)
    sample_prompts = eval_sample_prompts(cfg, inputs, tokenizer, runtime)
    saved_as = save_dtype(cfg, inputs)  # the checkpoint's, before --torch_dtype casts a model passed in memory
    policy, weights = load_models(cfg, inputs, runtime)
    body = policy.get_base_model() if is_lora(policy) else policy  # the Hugging Face model, LoRA layers injected
    asked = cfg.attn_implementation != "auto"
    # where only the main process holds the weights, in CPU memory, the layout check runs there with SDPA: a
    # kernel compiled (flex) or built (flash-attention) for the device does not run on the CPU copy
    if not (runtime.weights_on_main and attention in ("flex_attention", "flash_attention_2")):
        attention = set_attention([body, weights.model], attention, asked)
    live = [weights.model] if weights.kind == "model" and cfg.reference != "precomputed" else []
    check = lambda: choose_layout(cfg, [body, *live], [pairs, *([eval_pairs] if eval_pairs else [])],  # noqa: E731
                                  tokenizer.pad_token_id, next(body.parameters()).device, runtime.log)
    layout = runtime.on_main(check) if runtime.weights_on_main else check()  # where the weights are
    attention = set_attention([body, weights.model], attention, asked)
    set_per_segment([body, *live], layout.per_segment)  # the models the check covered
    runtime.log(f"fastdpo: attention: {attention}")
    runtime.log(f"fastdpo: layout: {layout.describe()}")
    module = LogpsModule(body, layout)
    sets = {"train": pairs, **({"eval": eval_pairs} if eval_pairs else {})}
    references = build_reference(cfg, policy, module, weights, layout, tokenizer.pad_token_id, sets, runtime)
    del weights, live  # a model that only precomputed is freed here (where the main process alone held the
    # weights, once it has computed them sharded: `reference.placed`)
    if cfg.gradient_checkpointing == "true":
        body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    world = runtime.processes.world
    if cfg.batch_size % world:
        raise UserError(f"--batch_size {cfg.batch_size} must be divisible by the {world} processes", exit_code=2)
    steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    state = TrainerState(steps_per_epoch, cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch))
    optimizer = make_optimizer(cfg, policy, runtime.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, state.total_steps))
    runner, optimizer = runtime.prepare(module, optimizer)  # `policy` stays the model to save
    references = placed(references, runtime)  # a reference model is sharded like the policy, once it is prepared
    gc.collect()  # a model sharded only to precompute is freed now (sharded modules hold reference cycles)
    run = Run(cfg, runtime, tokenizer, pairs, eval_pairs, policy, runner, layout, references["train"],
              references.get("eval"), optimizer, scheduler, state, plan,
              cfg.micro_batch_size or cfg.batch_size // world, saved_as)
    run.sample_prompts = sample_prompts
    if plan.resume_from:
        run.state = resume(run)
    return run


def load_models(cfg: Config, inputs: Inputs, runtime: Runtime):
    """The policy and the reference's weights, on the run's device. Under FSDP and ZeRO-3 over several processes
    only the main process reads the weights, and they stay where they were loaded until FSDP moves each process's shards to
    its device; the other processes hold the models' structure on the meta device (`Runtime.weights_on_main`)."""
    meta = runtime.weights_on_main and not runtime.main
    if runtime.weights_on_main:
        how = "FSDP2" if runtime.strategy == "fsdp" else "DeepSpeed ZeRO-3"
        runtime.log(f"fastdpo: {how}: the main process loads the weights; the other {runtime.processes.world - 1} "
                    "build the model on the meta device and receive their shards")
    policy = load_policy(cfg, inputs, meta=meta, strategy=runtime.strategy, log=runtime.log)
    device = None if runtime.weights_on_main else runtime.device  # the main process's stay on its CPU
    policy = policy if device is None else policy.to(device)
    return policy, reference_weights(cfg, policy, inputs, device, meta=meta)


def require_inputs(cfg: Config, inputs: Inputs) -> None:
    if inputs.model is None and not cfg.model:
        raise UserError("--model: no model to train; pass a model directory or hub id (builtin:tiny is a tiny "
                        "random model for trying fastdpo out)", exit_code=2)
    if inputs.data is None and not cfg.data:
        raise UserError("--data: no training data; pass preference pairs (a .jsonl/.json/.parquet file, a "
                        "datasets directory or a hub data set)", exit_code=2)


def eval_sample_prompts(cfg: Config, inputs: Inputs, tokenizer, runtime: Runtime) -> list:
    """--eval_samples: the first N distinct prompts of the eval data, as (prompt, ids); checked before the heavy
    work. The sampling options do nothing in training without it, so setting one is an error."""
    if not cfg.eval_samples:
        changed = [name for name in ("num_samples", "temperature", "top_p", "top_k", "max_new_tokens")
                   if getattr(cfg, name) != Config.__dataclass_fields__[name].default]
        if changed:
            raise UserError(f"--{changed[0]}: a sampling option, which training uses only with --eval_samples N "
                            "(samples at every evaluation); add it or drop the option", exit_code=2)
        return []
    source = inputs.eval_data if inputs.eval_data is not None else cfg.eval_data
    why = ("needs --eval_data (its first prompts are sampled)" if source is None or source == "" else
           "needs the reference model during training (the samples' KL); use --reference copy or model"
           if cfg.reference == "precomputed" else
           "samples in one process holding the whole model; under FSDP and ZeRO-3 the weights are sharded"
           if runtime.strategy == "fsdp" or runtime.zero3 else None)
    if why:
        raise UserError(f"--eval_samples {cfg.eval_samples}: {why}", exit_code=2)
    from fastdpo.data import load_prompts
    from fastdpo.tokenize import encode_prompt

    found = load_prompts(source, cfg.eval_data_split, Fields(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field),
                         name="eval_data", on_bad_record=cfg.on_bad_record, limit=cfg.eval_samples)
    return [(prompt, encode_prompt(prompt, tokenizer, where, cfg.max_prompt_length)[0]) for where, prompt in found]


def load_set(cfg: Config, tokenizer, in_memory, name: str, runtime: Runtime) -> PairSet | None:
    """The tokenized pairs of `data` or `eval_data` (None when no eval data is given), with the summary line."""
    source = in_memory if in_memory is not None else getattr(cfg, name)
    if source is None or (isinstance(source, str) and not source):
        return None
    split = cfg.data_split if name == "data" else cfg.eval_data_split
    pairs, stats = load_pairs(source, split, tokenizer, fields=Fields(cfg.prompt_field, cfg.chosen_field,
                                                                      cfg.rejected_field),
                              max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                              on_bad_record=cfg.on_bad_record, name=name, cache_dir=data_cache_dir(cfg),
                              processes=runtime.processes,
                              progress=cfg.progress and runtime.main and sys.stderr.isatty(), log=runtime.log)
    runtime.log(stats.summary("train data" if name == "data" else "eval data"))
    return pairs


def make_optimizer(cfg: Config, policy, device) -> torch.optim.Optimizer:
    trainable = [p for p in policy.parameters() if p.requires_grad]
    fused = device.type in ("cpu", "cuda") and all(p.dtype == torch.float32 for p in trainable)
    meta = any(p.is_meta for p in trainable)  # FSDP gives it its parameters on `device` (Runtime._fully_shard)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                                  fused=(fused and not meta) or None)
    if fused and meta:  # the fused kernel on every process alike; AdamW's constructor refuses meta parameters
        for group in optimizer.param_groups:
            group["fused"] = True
    return optimizer


def lr_lambda(cfg: Config, total_steps: int):
    """Linear warm-up over `warmup_steps`, then constant, linear or cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def finished_model(run: Run):
    """The trained policy as a caller uses it: in eval mode, without gradient checkpointing."""
    body = run.policy.get_base_model() if is_lora(run.policy) else run.policy
    if getattr(body, "is_gradient_checkpointing", False):
        body.gradient_checkpointing_disable()
    return run.policy.eval()


def plain_model(model, state_dict: dict):
    """A plain copy, on the CPU, of a model whose weights are sharded (FSDP's DTensors, ZeRO-3's partitions),
    holding `state_dict`, its weights gathered; its buffers (some not in the state dict) are copied across."""
    with torch.device("meta"):
        fresh = type(model)(model.config)
    missing, unexpected = fresh.load_state_dict(state_dict, strict=False, assign=True)
    fresh.tie_weights()
    buffers = dict(model.named_buffers())
    for name, _ in list(fresh.named_buffers()):
        owner_name, _, attr = name.rpartition(".")
        owner = fresh.get_submodule(owner_name)
        owner.register_buffer(attr, buffers[name].detach().cpu().clone(),
                              persistent=attr not in owner._non_persistent_buffers_set)
    left = [name for name, p in fresh.named_parameters() if p.is_meta]
    assert not left and not unexpected, f"the gathered weights do not fit the model: {left or unexpected}"
    return fresh.eval()


def synced_reference(run: Run):
    """The reference weights TR-DPO moves (saved in checkpoints), or None."""
    return run.reference.model if run.cfg.ref_sync_steps else None


def resume(run: Run) -> TrainerState:
    """Restore the weights, optimizer, scheduler and RNG from the latest checkpoint; return its trainer state.
    A larger step count than the run had continues it, with the learning-rate schedule recomputed."""
    from torch.distributed.checkpoint.api import CheckpointException

    path, rt, cfg = run.resume_from, run.runtime, run.cfg
    if rt.main:
        clean_partial_checkpoints(cfg.output_dir)
    rt.processes.barrier()
    try:
        saved = load_checkpoint(path, run.policy, run.optimizer, run.scheduler, synced_reference(run),
                                scaler=rt.accelerator.scaler, module=run.module, strategy=rt.strategy,
                                world=rt.processes.world)
    except (AssertionError, ValueError, KeyError, RuntimeError, CheckpointException) as e:
        raise UserError(f"--resume: {path} does not match this run's model or optimizer settings "
                        f"({str(e).splitlines()[0][:160]})", exit_code=2) from None
    state, total = TrainerState.from_json(saved), run.state.total_steps
    if state.steps_per_epoch != run.state.steps_per_epoch:
        raise UserError(f"--resume: {path} was written by a run of {state.steps_per_epoch} steps per epoch; this one "
                        f"has {run.state.steps_per_epoch}: resume with the same data and batch_size", exit_code=2)
    if total < state.step:
        raise UserError(f"--resume: {path} is at step {state.step}, past this run's {total} steps: give --max_steps "
                        f"(or --epochs) of at least {state.step}", exit_code=2)
    if total != state.total_steps:
        rt.log(f"fastdpo: resuming a run of {state.total_steps} steps at step {state.step} to train to {total}: "
               f"the learning-rate schedule is recomputed for {total} steps")
        state.total_steps = total
        for group, lr in zip(run.optimizer.param_groups, _scheduled_lrs(run.scheduler)):
            group["lr"] = lr  # the next step's rate under the new schedule
    rt.log(f"fastdpo: resumed from {path} at step {state.step}")
    return state


def _scheduled_lrs(scheduler) -> list[float]:
    return [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]


# --- helpers of the loop --------------------------------------------------------------------------------------


@dataclass
class ShareOfStep:
    """What one micro-batch of this process adds to its step."""

    metrics: dict[str, torch.Tensor]  # per-pair metric values, (b,) each
    tokens: int
    padding_share: float


@dataclass
class ProcessStep:
    """One process's part of a step, as the processes exchange it."""

    metrics: dict[str, torch.Tensor] | None  # per-pair values on the CPU; None: this process scored no pair
    tokens: int
    padding: list[float]  # padding share of each of its micro-batches
    stop_requested: bool  # a signal reached this process


@dataclass
class StepStats:
    """A step over all processes: the means over its global batch and what it took."""

    metrics: dict[str, float]
    tokens: int
    stop_requested: bool  # a signal reached some process: all stop after this step


def gather_step(processes: Processes, shares: list[ShareOfStep], stop_requested: bool) -> StepStats:
    """The step's numbers from every process, in one gather (a process's share of a short last batch can be
    empty)."""
    metrics = on_host({key: torch.cat([s.metrics[key] for s in shares]) for key in shares[0].metrics}) \
        if shares else None
    everyone = processes.gather(ProcessStep(metrics, sum(s.tokens for s in shares),
                                            [s.padding_share for s in shares], stop_requested))
    means = mean_metrics([p.metrics for p in everyone if p.metrics is not None])
    padding = [value for p in everyone for value in p.padding]
    means["padding_share"] = sum(padding) / len(padding)
    return StepStats(means, sum(p.tokens for p in everyone), any(p.stop_requested for p in everyone))


def optimizer_step(run: Run, finite: bool) -> None:
    """Step (or skip, for a non-finite loss or gradients) and count; stop after too many bad steps in a row."""
    state, rt = run.state, run.runtime
    if finite or rt.accelerator.scaler is not None:  # fp16's grad scaler must see every step to lower its scale
        run.optimizer.step()
        # DeepSpeed skips a step with non-finite gradients itself
        finite = finite and not rt.accelerator.optimizer_step_was_skipped and getattr(run.optimizer, "applied", True)
    if finite:
        run.scheduler.step()
        state.bad_in_row = 0
    else:  # skip the update; the data position still advances, so a resumed run skips it too
        state.skipped_steps, state.bad_in_row = state.skipped_steps + 1, state.bad_in_row + 1
        rt.log(f"fastdpo: step {state.step + 1}: non-finite loss or gradients, update skipped ({state.bad_in_row} "
               "in a row)")
    run.optimizer.zero_grad(set_to_none=True)
    if state.bad_in_row >= run.cfg.max_bad_steps:
        last_good = latest_checkpoint(run.cfg.output_dir)
        raise UserError(f"training stopped at step {state.step + 1}: {state.bad_in_row} steps in a row had a "
                        "non-finite loss or gradients (lower --learning_rate, check the data); last good checkpoint: "
                        f"{last_good or 'none (use --save_steps)'}")


def evaluate_now(run: Run, step: int, sinks) -> dict | None:
    """The held-out metrics (pooled over the processes), written as an `eval/` metrics line; None without eval data."""
    if not run.eval_pairs:
        return None
    cfg, rt = run.cfg, run.runtime
    run.module.eval()
    result = evaluate_pairs(run.module, run.eval_reference, run.eval_pairs, cfg, run.layout, run.pad_token_id,
                            cfg.eval_batch_size or run.micro_batch_size, rt,
                            Processes() if rt.sharded else rt.processes,
                            progress=cfg.progress and rt.main and sys.stderr.isatty())
    sinks.write({"step": step, **{f"eval/{k}": v for k, v in result.metrics.items()}})
    if run.sample_prompts:
        log_samples(run, step, sinks)
    run.module.train()
    return result.metrics


def log_samples(run: Run, step: int, sinks) -> None:
    """--eval_samples: the main process samples the fixed prompts from the policy (seeded by the step, so a resumed
    run draws the same), scores them under the policy and the run's reference, and logs them; the others wait."""
    rt = run.runtime
    if rt.main:
        from fastdpo.generation import training_samples
        from fastdpo.reference import NoReference

        module = rt.accelerator.unwrap_model(run.module)  # no strategy collectives: one process samples
        scorers = {"policy": lambda batch: module(batch)[0]}
        if not isinstance(run.eval_reference, NoReference):
            scorers["reference"] = lambda batch: run.eval_reference.logps(batch, ())
        rows, means = training_samples(run.policy, scorers, run.layout, run.sample_prompts, run.cfg, run.tokenizer,
                                       rt, seed=run.cfg.seed + step,
                                       batch_size=run.cfg.eval_batch_size or run.micro_batch_size)
        sinks.write({"step": step, **means})
        sinks.samples(step, rows)
    rt.accelerator.wait_for_everyone()


def open_outputs(run: Run) -> Sinks:
    """The output directory as the plan says (fastdpo's earlier files removed, or the resumed run's kept), its
    config.yaml, and where metrics go: metrics.jsonl and the --report_to trackers (the main process's)."""
    cfg, rt, out = run.cfg, run.runtime, run.cfg.output_dir
    if not rt.main:
        return Sinks(NoMetricsFile())
    if run.plan.clear:
        remove_ours(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise write_error("the output directory", out, e) from None
    claim(out, "config.yaml", "metrics.jsonl", *tracker_dirs(cfg.report_to),
          *(["samples.jsonl"] if cfg.eval_samples else []))
    print(cfg.to_yaml().rstrip(), file=sys.stderr)  # printed once set-up succeeded: a failure prints one line
    atomic_write_text(os.path.join(out, "config.yaml"), cfg.to_yaml())
    resumed = run.state.step if run.resume_from else None
    files = {name: MetricsFile(os.path.join(out, name), resume_step=resumed, rewrite=atomic_write_text,
                               failure=lambda e, name=name: write_error(name, out, e))
             for name in ("metrics.jsonl", *(["samples.jsonl"] if cfg.eval_samples else []))}
    return Sinks(files["metrics.jsonl"], open_trackers(cfg.report_to, out, dataclasses.asdict(cfg), os.path.basename(
        os.path.abspath(out)), resumed), files.get("samples.jsonl"))


def eval_line(when: str, metrics: dict) -> str:
    return (f"{when}: reward accuracy {metrics['rewards/accuracies']:.3f}, margin {metrics['rewards/margins']:.4f}, "
            f"loss {metrics['loss']:.4f}")


def print_summary(cfg: Config, before: dict | None, after: dict | None) -> None:
    lines = ["", "fastdpo: training finished"]
    if before and after:
        lines.append(f"  held-out reward accuracy: {before['rewards/accuracies']:.3f} -> "
                     f"{after['rewards/accuracies']:.3f}   (share of pairs with chosen reward > rejected)")
        lines.append(f"  held-out reward margin:   {before['rewards/margins']:.4f} -> "
                     f"{after['rewards/margins']:.4f}")
        lines.append(f"  held-out loss:            {before['loss']:.4f} -> {after['loss']:.4f}")
    elif after:
        lines.append(f"  held-out reward accuracy {after['rewards/accuracies']:.3f}, "
                     f"margin {after['rewards/margins']:.4f}")
    lines.append(f"  model saved to: {os.path.abspath(cfg.output_dir)}  "
                 "(AutoModelForCausalLM.from_pretrained loads it)")
    print("\n".join(lines))


class StopOnSignal:
    """SIGTERM or a first Ctrl-C asks the loop to stop after the current step (it then checkpoints and returns);
    a second Ctrl-C aborts at once. Handlers are installed only in the main thread and restored afterwards."""

    def __init__(self):
        self.requested, self._previous = None, {}

    def install(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.requested = signal.Signals(signum).name
        print(f"\nfastdpo: {self.requested}: finishing this step, then writing a checkpoint "
              "(Ctrl-C again to abort now)", file=sys.stderr)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
