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


def atomic_write_text(path: str, text: str) -> None:
    """Write `path` through a temporary file in the same directory and a rename: never half-written."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


LATEST = "latest"  # text file in checkpoints/ naming the newest complete checkpoint, written last


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, state: dict, keep: int = 0,
                    reference=None, scaler=None) -> str:
    """Write `checkpoints/step-N/` through a temporary directory and a rename, then point `latest` at it.

    A kill at any moment leaves either the previous `latest` or the new one, each complete.
    """
    root = os.path.join(output_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step}")
    tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{step}-")
    model.save_pretrained(tmp, safe_serialization=True)
    if reference is not None:  # TR-DPO moves the reference: it is part of the training state
        reference.save_pretrained(os.path.join(tmp, "reference"), safe_serialization=True)
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    if scaler is not None:  # fp16 loss scale
        torch.save(scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
    torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(state, f, indent=1)
    _fsync_dir(tmp)
    if os.path.exists(final):  # a stale copy of the same step (from a run that was resumed earlier)
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(os.path.join(root, LATEST), f"step-{step}\n")
    _prune(root, keep, current=f"step-{step}")
    return final


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


def load_checkpoint(path: str, model, optimizer, scheduler, reference=None, scaler=None) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; return the trainer state (step, epoch, ...)."""
    load_weights(model, path)
    if reference is not None:
        load_weights(reference, os.path.join(path, "reference"))
    # map to CPU first: rank 0 wrote them from its device, and every process of a multi-GPU resume reads them
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True))
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


def check_output_dir(output_dir: str, overwrite: bool, resume: bool) -> str | None:
    """Refuse a non-empty output_dir unless --overwrite or --resume; return the checkpoint to resume from."""
    exists = os.path.isdir(output_dir) and any(os.scandir(output_dir))
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir: {output_dir} exists and is not a directory", exit_code=2)
    if resume:
        path = latest_checkpoint(output_dir)
        if path is None:
            raise UserError(f"--resume: no checkpoint in {output_dir}/checkpoints to resume from (write them with "
                            "--save_steps N)", exit_code=2)
        return path
    if exists and not overwrite:
        raise UserError(f"--output_dir: {output_dir} is not empty; pass --overwrite to replace it or --resume to "
                        "continue its latest checkpoint", exit_code=2)
    return None


def prepare_fresh_output_dir(output_dir: str, overwrite: bool) -> None:
    """With --overwrite, the old contents go only now: after the data, models and config all loaded."""
    if os.path.isdir(output_dir) and overwrite:
        for entry in os.scandir(output_dir):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    os.makedirs(output_dir, exist_ok=True)


def save_final(output_dir: str, model, tokenizer, results: dict, lora: bool = False, merge_lora: bool = False,
               state_dict=None):
    """The final model and tokenizer (Hugging Face format, safetensors) plus the run's results; returns the model
    as it now is. `lora`: the model is a peft model, saved as its adapter; with `merge_lora` the adapter is then
    merged into the base in place (no second copy of the weights) and the merged model is saved and returned.
    `state_dict`: the weights gathered from their shards, when the model holds only its own shard."""
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=".tmp-final-")
    if lora:
        model.save_pretrained(tmp, selected_adapters=["default"])  # the adapter in peft's format
        if merge_lora:
            if "ref" in model.peft_config:
                model.delete_adapter("ref")
            merged = os.path.join(tmp, "merged")
            model = model.merge_and_unload()
            model.save_pretrained(merged, safe_serialization=True)
            tokenizer.save_pretrained(merged)
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    os.rmdir(tmp)
    atomic_write_text(os.path.join(output_dir, "results.json"), json.dumps(results, indent=1) + "\n")
    return model


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


def _fsync_dir(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
