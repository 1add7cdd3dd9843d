"""`fastdpo train`: one explicit training loop on accelerate."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import torch

from fastdpo.batching import batch_order
from fastdpo.checkpoint import (atomic_write_text, clean_partial_checkpoints, latest_checkpoint, load_checkpoint,
                                save_checkpoint)
from fastdpo.config import Config
from fastdpo.data import Fields
from fastdpo.errors import UserError
from fastdpo.evaluate import check_sample, evaluate_pairs, make_accelerator, make_scorer, score_batch
from fastdpo.logps import Scorer, ScorerModule
from fastdpo.metrics import MetricsFile, NoMetricsFile, ProgressBar, mean_metrics, pooled_means
from fastdpo.models import apply_lora, is_lora, load_model, load_tokenizer, resolve_data
from fastdpo.parallel import Processes
from fastdpo.reference import AdapterReference, default_cache_dir, precompute_reference, sync_reference
from fastdpo.tokenize import load_pairs


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    eval_before: dict | None
    eval_after: dict | None
    last_metrics: dict | None
    stopped: bool = False  # by SIGTERM or Ctrl-C, after writing a checkpoint


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


def train(cfg: Config, quickstart: bool = False) -> TrainResult:
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg)
    processes = Processes.current()  # data-parallel: each process takes every world-th pair of each batch
    main, world = processes.main, processes.world
    sharded = check_strategy(accelerator, cfg)
    resume_from = check_output_dir(cfg)
    processes.barrier()  # every process has checked the output dir before the main one writes to it
    set_seed(cfg.seed)
    log = (lambda text: print(text, file=sys.stderr)) if main else (lambda text: None)

    # --- setup: data, models, optimizer (nothing is written before this all succeeds) ---------------------------
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    fields = Fields(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    pairs, stats = load_pairs(resolve_data(cfg.data), cfg.data_split, tokenizer, fields=fields,
                              max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                              on_bad_record=cfg.on_bad_record)
    log(stats.summary("train data"))
    eval_pairs = None
    if cfg.eval_data:
        eval_pairs, eval_stats = load_pairs(resolve_data(cfg.eval_data), cfg.eval_data_split, tokenizer,
                                            fields=fields, max_length=cfg.max_length,
                                            max_prompt_length=cfg.max_prompt_length,
                                            on_bad_record=cfg.on_bad_record, name="eval data")
        log(eval_stats.summary("eval data"))
    device = accelerator.device
    pad = tokenizer.pad_token_id
    policy = load_model(cfg.model, cfg.seed, cfg.trust_remote_code, load_in_4bit=cfg.load_in_4bit)
    disable_dropout(policy)  # before LoRA wraps it, so --lora_dropout keeps its value
    if cfg.lora_r or cfg.adapter:
        policy = apply_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.adapter)
    policy.to(device)
    sample = check_sample(pairs + (eval_pairs or []))  # the scorer serves both
    # the scorer runs the Hugging Face model itself (with LoRA layers injected, when LoRA is on)
    policy_scorer = make_scorer(policy.get_base_model() if is_lora(policy) else policy, cfg, pad, sample, device,
                                log)
    ref_scorer = build_reference(cfg, policy, policy_scorer, pad, sample, device, log)
    if cfg.reference == "precomputed":
        # With --resume the policy has not moved yet here: its weights are still the starting point.
        sets = {"train": pairs, **({"eval": eval_pairs} if eval_pairs else {})}
        precompute_reference(ref_scorer, sets, cfg.eval_batch_size or cfg.micro_batch_size or cfg.batch_size,
                             device, accelerator.autocast, cfg.precision, reference_cache_dir(cfg), log, processes)
        ref_scorer = None  # the separate reference model, if any, is freed with it
    if cfg.gradient_checkpointing == "true":
        policy_scorer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if cfg.batch_size % world:
        raise UserError(f"--batch_size {cfg.batch_size} must be divisible by the {world} processes", exit_code=2)
    micro = cfg.micro_batch_size or cfg.batch_size // world
    steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    fused = device.type in ("cpu", "cuda") and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    # accelerate wraps the scorer's forward (DDP / FSDP / DeepSpeed act there); `policy` stays the model to save
    with warnings.catch_warnings():  # torch >= 2.10 renames DDP's broadcast_buffers; accelerate passes the old name
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
        runner, optimizer = accelerator.prepare(ScorerModule(policy_scorer), optimizer)
    policy_scorer.runner = runner
    prepare_reference(accelerator, ref_scorer, policy_scorer)
    if zero3(accelerator):  # ZeRO-3 gathers a weight only inside its module's forward: the lm_head's must run
        for scorer in (policy_scorer, ref_scorer):
            if isinstance(scorer, Scorer):
                scorer.head = "full"
    synced = ref_scorer.model if cfg.ref_sync_steps else None  # TR-DPO: the reference weights that move

    start_step = 0
    if resume_from:
        if main:
            clean_partial_checkpoints(cfg.output_dir)
        processes.barrier()
        try:
            state = load_checkpoint(resume_from, policy, optimizer, scheduler, synced, scaler=accelerator.scaler)
        except (AssertionError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"--resume: {resume_from} does not match this run's model or optimizer settings "
                            f"({str(e).splitlines()[0][:160]})", exit_code=2) from None
        if (state.get("steps_per_epoch"), state.get("total_steps")) != (steps_per_epoch, total_steps):
            raise UserError(f"--resume: {resume_from} was written by a run with {state.get('total_steps')} steps "
                            f"of {state.get('steps_per_epoch')} per epoch; this one has {total_steps} of "
                            f"{steps_per_epoch}: resume with the same data, batch_size, epochs and max_steps",
                            exit_code=2)
        start_step = state["step"]
        log(f"fastdpo: resumed from {resume_from} at step {start_step}")
    elif main:
        prepare_fresh_output_dir(cfg)
    if main:  # printed once everything has loaded, so a failed set-up prints only its one-line error
        print(cfg.to_yaml().rstrip(), file=sys.stderr)
        atomic_write_text(os.path.join(cfg.output_dir, "config.yaml"), cfg.to_yaml())
    metrics_file = MetricsFile(os.path.join(cfg.output_dir, "metrics.jsonl"),
                               resume_step=start_step if resume_from else None) if main else NoMetricsFile()

    def evaluate(step: int) -> dict | None:
        if not eval_pairs:
            return None
        runner.eval()
        # each process scores its shard; sharded weights (FSDP, ZeRO-3) need every process in every forward, so
        # there each scores them all
        share = Processes() if sharded else processes
        metrics, _ = evaluate_pairs(policy_scorer, ref_scorer, share.shard(eval_pairs), cfg,
                                    cfg.eval_batch_size or micro, device, accelerator.autocast)
        metrics = pooled_means(share.gather(metrics)) if share.world > 1 else metrics
        runner.train()
        metrics_file.write({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        return metrics

    eval_before = evaluate(start_step) if start_step == 0 else state.get("eval_before")
    if eval_before:
        log(f"eval before training: reward accuracy {eval_before['rewards/accuracies']:.3f}, "
            f"margin {eval_before['rewards/margins']:.4f}, loss {eval_before['loss']:.4f}")

    # --- the loop ----------------------------------------------------------------------------------------------
    runner.train()
    bar = ProgressBar(total_steps, initial=start_step, enabled=cfg.progress and main)
    window, window_start, last = [], time.perf_counter(), None
    orders = {}
    lengths = [p.num_tokens for p in pairs] if cfg.group_by_length else None
    skipped, bad_in_row = (state.get("skipped_steps", 0), state.get("bad_in_row", 0)) if resume_from else (0, 0)
    stop = StopOnSignal().install()  # SIGTERM / first Ctrl-C: finish the step, checkpoint, exit 0
    try:
        for step in range(start_step, total_steps):
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in orders:  # the data order is a function of (seed, epoch): resume needs only the step
                orders = {epoch: batch_order(len(pairs), cfg.batch_size, cfg.shuffle, cfg.seed, epoch, lengths)}
            positions = orders[epoch][index]
            parts, tokens, padding = [], 0, []
            micro_batches = process_micro_batches(positions, processes, micro)
            for k, (chunk, scale) in enumerate(micro_batches):
                chunk_pairs = [pairs[i] for i in chunk]
                batch = policy_scorer.collate(chunk_pairs).to(device)
                sync = accelerator.no_sync(runner) if k < len(micro_batches) - 1 else contextlib.nullcontext()
                with sync, accelerator.autocast():
                    scored = score_batch(policy_scorer, ref_scorer, batch, chunk_pairs, cfg, device)
                    accelerator.backward(scored.losses.sum() * scale)
                if scale:
                    parts.append(scored.metrics)
                    tokens += sum(p.num_tokens for p in chunk_pairs)
                    padding.append(batch.padding_share)
            grad_norm = clip_and_norm(accelerator, runner, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            # one gather per step: every process's per-pair metrics (a process's share of a short last batch can be
            # empty), its token and padding counts, and whether a signal reached it
            shares = processes.gather((per_pair_on_cpu(parts), tokens, padding, stop.requested is not None))
            metrics = mean_metrics([share[0] for share in shares if share[0] is not None])
            finite = math.isfinite(grad_norm) and math.isfinite(metrics["loss"])
            if finite or accelerator.scaler is not None:  # fp16's grad scaler must see every step to lower its scale
                optimizer.step()
                finite = finite and not accelerator.optimizer_step_was_skipped
            if finite:
                scheduler.step()
                bad_in_row = 0
            else:  # skip the update; the data position still advances, so a resumed run skips it too
                skipped, bad_in_row = skipped + 1, bad_in_row + 1
                log(f"fastdpo: step {step + 1}: non-finite loss or gradients, update skipped ({bad_in_row} in a row)")
            optimizer.zero_grad(set_to_none=True)
            if bad_in_row >= cfg.max_bad_steps:
                last_good = latest_checkpoint(cfg.output_dir)
                raise UserError(f"training stopped at step {step + 1}: {bad_in_row} steps in a row had a non-finite "
                                f"loss or gradients (lower --learning_rate, check the data); last good checkpoint: "
                                f"{last_good or 'none (use --save_steps)'}")
            if synced is not None and (step + 1) % cfg.ref_sync_steps == 0:
                sync_reference(synced, policy, cfg.ref_sync_alpha)

            padding = [value for share in shares for value in share[2]]
            metrics["padding_share"] = sum(padding) / len(padding)
            metrics["skipped_steps"] = skipped
            window.append((metrics, grad_norm, sum(share[1] for share in shares), len(positions)))
            elapsed = time.perf_counter() - window_start
            metrics["pairs_per_second"] = sum(w[3] for w in window) / max(elapsed, 1e-9)
            bar.update(metrics)
            done = step + 1
            if done % cfg.logging_steps == 0 or done == total_steps:
                last = log_window(metrics_file, window, elapsed, done, epoch + (index + 1) / steps_per_epoch, lr)
                window, window_start = [], time.perf_counter()
            if cfg.eval_steps and done % cfg.eval_steps == 0 and done != total_steps:
                result = evaluate(done)
                if result and main:
                    bar.write(f"step {done}: eval reward accuracy {result['rewards/accuracies']:.3f}, "
                              f"margin {result['rewards/margins']:.4f}, loss {result['loss']:.4f}")
            stopping = any(share[3] for share in shares) and done != total_steps  # all stop after this step
            if stopping and sharded:
                raise UserError(f"stopped by {stop.requested or 'a signal'} after step {done}: mid-run checkpoints "
                                "are not supported under FSDP or DeepSpeed yet, nothing was saved")
            if ((cfg.save_steps and done % cfg.save_steps == 0 and done != total_steps) or stopping) and main:
                save_checkpoint(cfg.output_dir, done, policy, optimizer, scheduler,
                                {"step": done, "epoch": epoch, "batch_in_epoch": index + 1,
                                 "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                                 "skipped_steps": skipped, "bad_in_row": bad_in_row, "eval_before": eval_before},
                                keep=cfg.save_total_limit, reference=synced, scaler=accelerator.scaler)
            accelerator.wait_for_everyone()
            if stopping:
                bar.close()
                log(f"fastdpo: {stop.requested or 'stop'}: stopped after step {done} of {total_steps}; checkpoint "
                    "written, continue with the same command plus --resume")
                return TrainResult(cfg.output_dir, done, eval_before, None, last, stopped=True)
    finally:
        stop.uninstall()
    bar.close()

    eval_after = evaluate(total_steps)
    state_dict = full_state_dict(accelerator, runner) if sharded else None  # every process takes part
    if main:
        save_final(cfg, policy, tokenizer, total_steps, eval_before, eval_after, state_dict)
        print_summary(cfg, eval_before, eval_after, quickstart)
    accelerator.wait_for_everyone()
    return TrainResult(cfg.output_dir, total_steps, eval_before, eval_after, last)


# --- helpers of the loop ------------------------------------------------------------------------------------------


def process_micro_batches(positions: list[int], processes: Processes, micro: int) -> list[tuple[list[int], float]]:
    """This process's micro-batches of a global batch, each with its loss scale (sum of per-pair losses / global
    pairs, once DDP has averaged the processes' gradients).

    Every process gets the same number of micro-batches, because FSDP gathers weights in every forward: where a
    short last batch leaves a process fewer, it runs a zero-scale copy of one pair, which changes no gradient
    but takes part in the collectives."""
    local = processes.shard(positions)
    count = math.ceil(math.ceil(len(positions) / processes.world) / micro)
    scale = processes.world / len(positions)
    batches = [(local[i : i + micro], scale) for i in range(0, len(local), micro)]
    return batches + [(positions[:1], 0.0)] * (count - len(batches))


def check_strategy(accelerator, cfg: Config) -> bool:
    """True under FSDP or DeepSpeed: sharded weights and optimizer state, which mid-run checkpoints do not cover
    yet (the final model is saved)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return False
    for flag, value in (("--save_steps", cfg.save_steps), ("--resume", cfg.resume), ("--lora_r", cfg.lora_r),
                        ("--adapter", cfg.adapter), ("--ref_sync_steps", cfg.ref_sync_steps)):
        if value:
            raise UserError(f"{flag}: not supported under {kind.value} yet (checkpoints, LoRA and TR-DPO run with "
                            "DDP or one process)", exit_code=2)
    if kind == DistributedType.DEEPSPEED:
        share = cfg.batch_size // accelerator.num_processes
        if cfg.micro_batch_size and cfg.micro_batch_size != share:
            raise UserError(f"--micro_batch_size {cfg.micro_batch_size}: DeepSpeed steps its optimizer at every "
                            f"backward, so a process takes its whole share ({share}) at once here", exit_code=2)
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = share  # no data loader is prepared, so accelerate cannot infer it
        ds["gradient_clipping"] = cfg.max_grad_norm  # DeepSpeed clips inside its step (0: no clipping)
    return True


def zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3


def prepare_reference(accelerator, reference, policy_scorer: Scorer) -> None:
    """A separate reference model follows the policy's strategy, without an optimizer: FSDP shards it too and
    DeepSpeed ZeRO-3 runs it as an inference engine (other ZeRO stages hold it whole). DDP has nothing to
    synchronise in a frozen model, so there and in one process it stays as it is."""
    from accelerate.utils import DistributedType

    if not isinstance(reference, Scorer) or reference is policy_scorer:
        return  # none, precomputed, or the LoRA policy with its adapters off
    if accelerator.distributed_type == DistributedType.FSDP:
        module = ScorerModule(reference)
        if accelerator.is_fsdp2:  # accelerate shards FSDP2 models only together with an optimizer: shard it here,
            from torch.distributed.fsdp import fully_shard  # a unit per decoder layer plus the root, as the policy

            layers = set(module._no_split_modules or ())
            for sub in module.modules():
                if type(sub).__name__ in layers:
                    fully_shard(sub)
            reference.runner = fully_shard(module)
        else:
            reference.runner = accelerator.prepare_model(module)
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        zero = config.setdefault("zero_optimization", {})
        zero.pop("offload_optimizer", None)
        if zero.get("stage") != 3:
            zero["stage"] = 0
        reference.runner, *_ = deepspeed.initialize(model=ScorerModule(reference), config=config)
        reference.runner.eval()


def full_state_dict(accelerator, runner) -> dict:
    """The policy's whole state dict, gathered from its shards (FSDP, ZeRO-3); every process must call this."""
    state = accelerator.get_state_dict(runner)
    return {key.removeprefix("model."): value for key, value in state.items()} if state else state


def disable_dropout(model) -> None:
    """DPO compares log-probs of the policy and the reference: dropout noise would bias both (TRL does the same)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def build_reference(cfg: Config, policy, policy_scorer: Scorer, pad: int, sample, device,
                    log) -> Scorer | None:
    """The frozen reference's scorer: an in-memory copy of the starting policy, a separate model, or none.

    For --reference precomputed, the model the log-probs are computed with: --ref_model, or the starting policy
    itself (no copy is made; nothing has trained it yet)."""
    if cfg.reference == "none":
        return None
    if cfg.ref_model:
        reference = load_model(cfg.ref_model, cfg.seed, cfg.trust_remote_code, flag="ref_model").to(device)
    elif is_lora(policy):
        return AdapterReference(policy_scorer, policy)  # the same weights with the adapters off
    elif cfg.reference == "precomputed":
        return policy_scorer  # the starting policy computes them itself: no copy, no second check
    else:
        reference = copy.deepcopy(policy)
    disable_dropout(reference)
    reference.eval().requires_grad_(False)
    return make_scorer(reference, cfg, pad, sample, device, log)


def reference_cache_dir(cfg: Config) -> str | None:
    if cfg.ref_cache_dir == "off":
        return None
    return os.path.expanduser(cfg.ref_cache_dir) if cfg.ref_cache_dir else default_cache_dir()


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


def clip_and_norm(accelerator, model, max_grad_norm: float) -> float:
    """Clip the global gradient norm (when max_grad_norm > 0) and return the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)
        return 0.0 if norm is None else float(norm)  # None: DeepSpeed clips inside its own step
    if not params:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])))


def per_pair_on_cpu(parts: list[dict]) -> dict | None:
    """The per-pair metric tensors of a step's micro-batches, concatenated on the CPU (to send to the other
    processes); None when this process scored no pair."""
    return {key: torch.cat([p[key] for p in parts]).cpu() for key in parts[0]} if parts else None


def log_window(metrics_file, window, elapsed: float, step: int, epoch: float, lr: float) -> dict:
    pairs = sum(w[3] for w in window)
    record = {"step": step, "epoch": round(epoch, 4), "learning_rate": lr}
    for key in window[-1][0]:
        if key != "pairs_per_second":
            record[key] = sum(w[0][key] * w[3] for w in window) / pairs
    record["grad_norm"] = sum(w[1] for w in window) / len(window)
    record["pairs_per_second"] = pairs / max(elapsed, 1e-9)
    record["tokens_per_second"] = sum(w[2] for w in window) / max(elapsed, 1e-9)
    metrics_file.write(record)
    return record


# --- the output directory -----------------------------------------------------------------------------------------


def check_output_dir(cfg: Config) -> str | None:
    """Refuse a non-empty output_dir unless --overwrite or --resume; return the checkpoint to resume from."""
    out = cfg.output_dir
    exists = os.path.isdir(out) and any(os.scandir(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir: {out} exists and is not a directory", exit_code=2)
    if cfg.resume:
        path = latest_checkpoint(out)
        if path is None:
            raise UserError(f"--resume: no checkpoint in {out}/checkpoints to resume from (write them with "
                            "--save_steps N)", exit_code=2)
        return path
    if exists and not cfg.overwrite:
        raise UserError(f"--output_dir: {out} is not empty; pass --overwrite to replace it or --resume to "
                        "continue its latest checkpoint", exit_code=2)
    return None


def prepare_fresh_output_dir(cfg: Config) -> None:
    """With --overwrite, the old contents go only now: after the data, models and config all loaded."""
    out = cfg.output_dir
    if os.path.isdir(out) and cfg.overwrite:
        for entry in os.scandir(out):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    os.makedirs(out, exist_ok=True)


def save_final(cfg: Config, model, tokenizer, steps: int, eval_before, eval_after, state_dict=None) -> None:
    """The final model and tokenizer (Hugging Face format, safetensors) plus the run's results. `state_dict`: the
    weights gathered from their shards, when the model holds only its own shard."""
    import tempfile

    tmp = tempfile.mkdtemp(dir=cfg.output_dir, prefix=".tmp-final-")
    if is_lora(model):
        model.save_pretrained(tmp, selected_adapters=["default"])  # the adapter in peft's format
        if cfg.merge_lora:
            if "ref" in model.peft_config:
                model.delete_adapter("ref")
            merged = os.path.join(tmp, "merged")
            model.merge_and_unload().save_pretrained(merged, safe_serialization=True)
            tokenizer.save_pretrained(merged)
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(cfg.output_dir, name))
    os.rmdir(tmp)
    results = {"steps": steps, "eval_before": eval_before, "eval_after": eval_after}
    atomic_write_text(os.path.join(cfg.output_dir, "results.json"), json.dumps(results, indent=1) + "\n")


def print_summary(cfg: Config, before: dict | None, after: dict | None, quickstart: bool) -> None:
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
    if quickstart:
        lines.append("  next: fastdpo train --model YOUR_MODEL_DIR --data YOUR_PAIRS.jsonl --output_dir OUT")
    print("\n".join(lines))
