"""The output directory: atomic file writes, the trainer state, checkpoints and resume, the final model."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass

import torch

from fastdpo.errors import UserError
from fastdpo.outputs import (TEMPORARY, WriteError, atomic_directory, atomic_write_text, chmod_tree, claim,
                             finish_directory, os_error, torch_save, write_error)


@dataclass
class TrainerState:
    """Where a run is. Every run has one; each checkpoint saves it as trainer_state.json and --resume restores it."""

    steps_per_epoch: int
    total_steps: int
    step: int = 0  # optimizer steps done
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss or gradients)
    bad_in_row: int = 0
    eval_before: dict | None = None  # the held-out metrics before training

    def to_json(self) -> dict:
        """With the epoch of the last step done and its batch's number in that epoch, counted from 1."""
        epoch, index = divmod(self.step - 1, self.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "batch_in_epoch": index + 1, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> "TrainerState":
        return cls(**{key: data.get(key, value) for key, value in asdict(cls(0, 0)).items()})


LATEST = "latest"  # text file in checkpoints/ naming the newest complete checkpoint, written last


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, state: dict, keep: int = 0,
                    reference=None, scaler=None) -> str:
    """Write `checkpoints/step-N/` through a temporary directory and a rename, then point `latest` at it.

    A kill at any moment leaves either the previous `latest` or the new one, each complete; a failed write leaves
    the previous one and says where it is."""
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"step-{step}")
    previous = latest_checkpoint(output_dir)
    try:
        claim(output_dir, "checkpoints")
        with atomic_directory(final, f"the checkpoint of step {step}", _nbytes(model, optimizer, reference)) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if reference is not None:  # TR-DPO moves the reference: it is part of the training state
                reference.save_pretrained(os.path.join(tmp, "reference"), safe_serialization=True)
            torch_save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            _save_rest(tmp, scheduler, state, scaler)
        atomic_write_text(os.path.join(root, LATEST), f"step-{step}\n", "the checkpoint pointer")
    except WriteError as e:
        last = f"the last complete checkpoint is {previous}" if previous else "no checkpoint was written before"
        raise WriteError(f"{e}; {last}") from None
    _prune(root, keep, current=f"step-{step}")
    return final


SHARDED = "sharded"  # in a checkpoint written under FSDP: the weights and optimizer state, torch.distributed.checkpoint
DEEPSPEED = "deepspeed"  # under DeepSpeed: the engine's own checkpoint (its weights and partitioned optimizer state)


def save_sharded_checkpoint(output_dir: str, step: int, module, optimizer, scheduler, state: dict, processes,
                            strategy: str, keep: int = 0, scaler=None) -> str:
    """`save_checkpoint` under FSDP or DeepSpeed (`strategy`), called by every process: each writes its own shards
    of the weights and the optimizer state (`write_shards`) into the main process's temporary directory; the main
    process checks they are all there, adds the rest, renames it into place and points `latest` at it, as for one
    process. A failure on any process leaves the previous checkpoint, removes the temporary directory and is the
    same one line on every process (every process makes the same collective calls on every path)."""
    from torch.distributed.checkpoint.api import CheckpointException

    root = os.path.join(output_dir, "checkpoints")
    final, previous = os.path.join(root, f"step-{step}"), latest_checkpoint(output_dir)
    what = f"the checkpoint of step {step}"
    tmp = failure = error = None

    def failed(e: BaseException) -> str:
        """The one line for a failed write; a failure that is not the system's is kept to be raised on main."""
        nonlocal error
        if isinstance(e, WriteError):
            return str(e)
        causes = [os_error(e)] + [os_error(f[0] if isinstance(f, tuple) else f)
                                  for f in getattr(e, "failures", {}).values()]
        cause = next((c for c in causes if c is not None), None)
        if cause is None:
            error = e
            return f"{what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        return str(write_error(what, root, cause, None))

    if processes.main:
        try:
            claim(output_dir, "checkpoints")
            os.makedirs(root, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=root, prefix=f"{TEMPORARY}step-{step}-")
        except (OSError, WriteError) as e:
            failure = failed(e)
    tmp, failure = processes.gather((tmp, failure))[0]
    if failure is None:
        try:
            write_shards(strategy, tmp, module, optimizer)
        except (Exception, CheckpointException) as e:  # the writers fail without leaving the others waiting
            failure = failed(e)
        failure = next((f for f in processes.gather(failure) if f), None)
    if processes.main and failure is None:
        try:
            missing = missing_shards(tmp, processes.world)
            if missing:  # written elsewhere: another machine's file system, not the one main renames on
                failure = (f"{what}: the shard files {', '.join(missing[:3])} are not in {tmp} (the processes of a "
                           "run on several machines need an --output_dir on a file system they share)")
            else:
                _save_rest(tmp, scheduler, state, scaler)
                finish_directory(tmp, final)
                atomic_write_text(os.path.join(root, LATEST), f"step-{step}\n", "the checkpoint pointer")
        except Exception as e:
            failure = failed(e)
    if processes.main and failure is not None and tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    failure = processes.gather(failure)[0]
    if error is not None:
        raise error  # a bug, not a full disk: its traceback, after every process has left the collectives
    if failure is not None:
        last = f"the last complete checkpoint is {previous}" if previous else "no checkpoint was written before"
        raise WriteError(f"{failure}; {last}")
    if processes.main:
        _prune(root, keep, current=f"step-{step}")
    return final


def write_shards(strategy: str, folder: str, module, optimizer) -> None:
    """This process's shards of the weights and optimizer state, into `folder`: FSDP's through
    torch.distributed.checkpoint (`sharded/`, which a run with another number of processes can read), DeepSpeed's
    through its engine (`deepspeed/`)."""
    if strategy == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(module, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(folder, SHARDED))
        return
    saves = _KeepFailedWrite(module.checkpoint_engine)
    module.checkpoint_engine = saves
    copy_script = module._copy_recovery_script  # the main process copies zero_to_fp32.py with shutil, not torch

    def keep_failed_copy(save_path):
        if saves.failure is None:
            try:
                copy_script(save_path)
            except Exception as e:  # as `_KeepFailedWrite.save`: raised after DeepSpeed's save has returned
                saves.failure = e

    module._copy_recovery_script = keep_failed_copy
    try:
        module.save_checkpoint(folder, tag=DEEPSPEED, save_latest=False)
    finally:
        module.checkpoint_engine = saves.inner
        del module._copy_recovery_script
    if saves.failure is not None:
        raise saves.failure


class _KeepFailedWrite:
    """DeepSpeed's checkpoint engine with a failed write kept instead of raised, and raised by `write_shards` once
    DeepSpeed's save has returned: it waits for the other processes inside, so a process that raised out of it
    would leave them waiting there for ever. Its torch.save goes through a Python file, so that a failed write
    keeps its operating-system error."""

    def __init__(self, inner):
        self.inner, self.failure = inner, None

    def save(self, state_dict, path: str) -> None:
        if self.failure is not None:  # the checkpoint is lost anyway: write nothing more
            return
        try:
            if type(self.inner).__name__ == "TorchCheckpointEngine":
                with open(path, "wb") as f:
                    torch.save(state_dict, f, _use_new_zipfile_serialization=self.inner.zipfile_serialization)
            else:
                self.inner.save(state_dict, path)
        except Exception as e:  # any failure, so that this process stays in step with the others; raised after
            self.failure = e

    def __getattr__(self, name):
        return getattr(self.inner, name)


def missing_shards(folder: str, world: int) -> list[str]:
    """The shard files of a checkpoint directory's sharded weights that are not in it: those the metadata of a
    torch.distributed.checkpoint names, or each of DeepSpeed's `world` processes' optimizer partition."""
    if os.path.isdir(os.path.join(folder, DEEPSPEED)):
        names = [os.path.join(DEEPSPEED, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt") for rank in range(world)]
    else:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(os.path.join(folder, SHARDED)).read_metadata()
        names = sorted({os.path.join(SHARDED, info.relative_path) for info in (metadata.storage_data or {}).values()})
    return [name for name in names if not os.path.isfile(os.path.join(folder, name))]


def _save_rest(folder: str, scheduler, state: dict, scaler=None) -> None:
    """A checkpoint's schedule, RNG, loss-scale and trainer state files."""
    if scaler is not None:  # fp16 loss scale
        torch_save(scaler.state_dict(), os.path.join(folder, "scaler.pt"))
    torch_save(scheduler.state_dict(), os.path.join(folder, "scheduler.pt"))
    torch_save(rng_state(), os.path.join(folder, "rng.pt"))
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump(state, f, indent=1)


def load_sharded(path: str, module, optimizer) -> None:
    """The weights and optimizer state of a checkpoint written under FSDP, into `module` and `optimizer` as this
    run holds them (sharded over any number of processes, or whole in one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=os.path.join(path, SHARDED))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _nbytes(*objects) -> int:
    """The bytes of the tensors in these models and optimizers (what a checkpoint of them holds, about)."""
    total = 0
    for obj in objects:
        if obj is None:
            continue
        state = obj.state_dict()
        tensors = state.values() if hasattr(obj, "parameters") else \
            [t for s in state.get("state", {}).values() for t in s.values()]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def clean_partial_checkpoints(output_dir: str) -> None:
    """Remove the temporary directories of checkpoints a killed run did not finish."""
    root = os.path.join(output_dir, "checkpoints")
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(".tmp-"):
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


def latest_checkpoint(output_dir: str) -> str | None:
    root = os.path.join(output_dir, "checkpoints")
    try:
        with open(os.path.join(root, LATEST)) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    path = os.path.join(root, name)
    return path if os.path.isfile(os.path.join(path, "trainer_state.json")) else None


def load_checkpoint(path: str, model, optimizer, scheduler, reference=None, scaler=None, module=None,
                    strategy: str = "single", world: int = 1) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; return the trainer state (step, epoch, ...).
    `module`: the training module around `model` (as FSDP or DeepSpeed wrapped it); `strategy` and `world`: how
    this run holds it."""
    written = "fsdp" if os.path.isdir(os.path.join(path, SHARDED)) else \
        "deepspeed" if os.path.isdir(os.path.join(path, DEEPSPEED)) else "plain"
    readers = {"fsdp": ("fsdp", "single", "ddp"), "deepspeed": ("deepspeed",), "plain": ("single", "ddp")}
    if strategy not in readers[written]:
        how = {"fsdp": "under FSDP", "deepspeed": "under DeepSpeed", "plain": "without FSDP or DeepSpeed"}[written]
        where = {"fsdp": "under FSDP, DDP or in one process", "plain": "with DDP or one process",
                 "deepspeed": "under DeepSpeed with the same ZeRO stage and number of processes"}[written]
        raise UserError(f"--resume: {path} was written {how}; resume it {where}", exit_code=2)
    if written == "fsdp":
        load_sharded(path, module, optimizer)
    elif written == "deepspeed":
        names = os.listdir(os.path.join(path, DEEPSPEED))
        saved = len([n for n in names if n.endswith("_optim_states.pt")])
        stage = 3 if "zero_pp_rank_0_mp_rank_00_model_states.pt" in names else 2  # ZeRO-3 partitions the weights
        if stage != module.zero_optimization_stage():
            raise UserError(f"--resume: {path} was written under DeepSpeed ZeRO-{stage}; resume it with ZeRO-{stage} "
                            f"(configs/accelerate/deepspeed-zero{stage}.yaml or --strategy zero{stage})", exit_code=2)
        if saved != world:
            raise UserError(f"--resume: {path} was written by {saved} DeepSpeed processes; resume it with "
                            f"{saved} (DeepSpeed's checkpoints are per process; FSDP's resume with any number)",
                            exit_code=2)
        loaded, _ = module.load_checkpoint(path, tag=DEEPSPEED, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        if loaded is None:
            raise UserError(f"--resume: {path}: DeepSpeed could not load its checkpoint", exit_code=2)
    else:
        load_weights(model, path)
        # map to CPU first: rank 0 wrote them from its device, and every process of a multi-GPU resume reads them
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu",
                                             weights_only=True))
    if reference is not None:
        load_weights(reference, os.path.join(path, "reference"))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu", weights_only=True))
    set_rng_state(torch.load(os.path.join(path, "rng.pt"), map_location="cpu", weights_only=True))
    if scaler is not None and os.path.isfile(os.path.join(path, "scaler.pt")):
        scaler.load_state_dict(torch.load(os.path.join(path, "scaler.pt"), map_location="cpu", weights_only=True))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def load_weights(model, folder: str) -> None:
    """Load `save_pretrained` safetensors weights (single file or sharded) into `model`, strictly."""
    from safetensors.torch import load_file

    if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):  # a LoRA policy: its adapter only
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(os.path.join(folder, "adapter_model.safetensors")))
        assert not result.unexpected_keys, f"adapter in {folder} does not match: {result.unexpected_keys}"
        return
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied]
    assert not missing and not unexpected, f"checkpoint {folder} does not match the model: {missing or unexpected}"


def _tied_names(model) -> set[str]:
    seen, tied = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            tied.update({name, seen[ptr]})
        seen[ptr] = name
    return tied


def _write_card(directory: str, card: str | None) -> None:
    if card is not None:
        with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)


def save_final(output_dir: str, model, tokenizer, results: dict, lora: bool = False, merge_lora: bool = False,
               state_dict=None, dtype: torch.dtype | None = None, card: str | None = None):
    """The final model and tokenizer (Hugging Face format, safetensors) plus the run's results; returns the model
    as it now is. `lora`: the model is a peft model, saved as its adapter; with `merge_lora` the adapter is then
    merged into the base in place (no second copy of the weights) and the merged model is saved and returned.
    `state_dict`: the weights gathered from their shards, when the model holds only its own shard; `dtype`: the
    saved weights' (a LoRA adapter keeps its own); `card`: the model card, saved as README.md beside the model
    (and the merged one). A failed save removes what it wrote and says where the last
    checkpoint is."""
    try:
        tmp = tempfile.mkdtemp(dir=output_dir, prefix=TEMPORARY + "final-")
        try:
            if lora:
                model.save_pretrained(tmp, selected_adapters=["default"])  # the adapter in peft's format
                if merge_lora:
                    if "ref" in model.peft_config:
                        model.delete_adapter("ref")
                    merged = os.path.join(tmp, "merged")
                    model = model.merge_and_unload()
                    save_model(model, merged, None, dtype)
                    tokenizer.save_pretrained(merged)
                    _write_card(merged, card)
            else:
                save_model(model, tmp, state_dict, dtype)
            tokenizer.save_pretrained(tmp)
            _write_card(tmp, card)
            chmod_tree(tmp)  # what save_pretrained wrote gets the user's umask, as everything fastdpo writes
            names = os.listdir(tmp)
            claim(output_dir, *names, "results.json")
            for name in names:
                target = os.path.join(output_dir, name)
                if os.path.isdir(target) and not os.path.islink(target):  # an earlier run's merged/ (ours)
                    shutil.rmtree(target)
                os.replace(os.path.join(tmp, name), target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        atomic_write_text(os.path.join(output_dir, "results.json"), json.dumps(results, indent=1) + "\n")
        claim(output_dir, finished=True)
    except BaseException as e:
        failure = e if isinstance(e, WriteError) else os_error(e)
        if failure is None:
            raise
        last = latest_checkpoint(output_dir)
        where = (f"the last checkpoint, {os.path.basename(last)}, is at {last} (the same command with --resume "
                 "continues from it)" if last else "no checkpoint was written (--save_steps N writes them)")
        cause = failure if isinstance(failure, WriteError) else write_error("the final model", output_dir, failure,
                                                                            _nbytes(model))
        raise WriteError(f"{cause}; {where}") from None
    return model


def save_model(model, folder: str, state_dict=None, dtype: torch.dtype | None = None) -> None:
    """`save_pretrained` (safetensors) with the weights in `dtype` (None: as they are), config.json saying so."""
    state = state_dict if state_dict is not None else model.state_dict()
    dtype = dtype or next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    if any(v.is_floating_point() and v.dtype != dtype for v in state.values()):
        cast = {}  # by the memory each name views, so that tied weights stay one tensor

        def key(v):
            return v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride()

        state = {k: cast.setdefault(key(v), v.to(dtype)) if v.is_floating_point() else v for k, v in state.items()}
    model.save_pretrained(folder, safe_serialization=True, state_dict=state)
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("dtype", str(dtype).removeprefix("torch.")) != str(dtype).removeprefix("torch."):
        config["dtype"] = str(dtype).removeprefix("torch.")  # save_pretrained writes the in-memory model's
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prune(root: str, keep: int, current: str) -> None:
    if keep <= 0:
        return
    steps = sorted((int(n.split("-")[1]), n) for n in os.listdir(root) if n.startswith("step-"))
    for _, name in steps[:-keep]:
        if name != current:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
