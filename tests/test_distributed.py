"""Data parallel on CPU: 2 processes (torchrun, gloo) train exactly what one process trains on the same global batch."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_same_weights, model_and_pairs

# 17 pairs in batches of 8: steps of 8, 8 and 1 pairs. Each process's share of 8 is 4, taken in micro-batches of
# 2 (accumulation inside a process); the last batch leaves the second process nothing at all.
FLAGS = ["--batch_size", "8", "--micro_batch_size", "2", "--epochs", "1", "--learning_rate", "1e-3",
         "--adam_epsilon", "1e-5", "--logging_steps", "1", "--progress", "false", "--seed", "5"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return model_and_pairs(tmp_path_factory, "ddp", seed=11, rows=17)


CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "accelerate")
GPUS = torch.cuda.device_count()


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def two_workers(base, out, *flags) -> list[str]:
    """The torchrun command of `fastdpo train` in 2 processes on the tests' model and pairs (for `subprocess.Popen`,
    where `launch`'s wait is not wanted)."""
    root, model, data = base
    return [*TORCHRUN_2, "-m", "fastdpo", "train", "--model", model, "--data", data, "--output_dir", str(out), *FLAGS,
            *flags]


def worker_env() -> dict:
    """The environment of the launched processes: one thread each (two share the 2 cores). With 2 or more GPUs
    they run on them (NCCL); with one, on CPU processes (gloo), since NCCL takes a GPU per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {**env, "CUDA_VISIBLE_DEVICES": ""} if GPUS == 1 else env


def launch(base, out, processes: int, *flags, expect_code: int = 0, config: str | None = None
           ) -> subprocess.CompletedProcess:
    """`fastdpo train` in `processes` processes under torchrun, or `accelerate launch --config_file CONFIG`
    (one process: plain `python -m fastdpo`)."""
    root, model, data = base
    args = ["-m", "fastdpo", "train", "--model", model, "--data", data, "--output_dir", str(out), *FLAGS, *flags]
    if config:
        args = ["-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, config),
                "--num_processes", str(processes)] + args
    elif processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] + args
    env = worker_env()
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == expect_code, result.stderr[-3000:]
    return result


def train_lines(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]


@pytest.fixture(scope="module")
def single(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    launch(base, out, 1, "--eval_data", base[2])
    return out


def test_two_processes_equal_one_with_the_same_global_batch(base, single, tmp_path):
    result = launch(base, tmp_path / "two", 2, "--eval_data", base[2])
    assert_same_weights(single, tmp_path / "two", atol=1e-5)
    one, two = train_lines(single), train_lines(tmp_path / "two")
    assert [line["step"] for line in two] == [1, 2, 3]  # written once, by the main process
    for a, b in zip(one, two):  # metrics are means over the global batch, not over one process's share
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    results = [json.load(open(os.path.join(out, "results.json"))) for out in (single, tmp_path / "two")]
    for when in ("eval_before", "eval_after"):  # the eval set is scored in shards and pooled
        assert results[1][when]["pairs"] == 17
        assert results[1][when]["loss"] == pytest.approx(results[0][when]["loss"], rel=1e-5)
    assert result.stderr.count("fastdpo: training finished") == 0  # the summary goes to stdout, once
    assert result.stdout.count("fastdpo: training finished") == 1


def test_eval_samples_under_two_processes_equal_one(base, tmp_path):
    """--eval_samples under DDP: the main process samples with the unwrapped policy while the others wait; the
    samples (seeded by the step) and their KL equal one process's."""
    flags = ("--eval_data", base[2], "--eval_samples", "2", "--num_samples", "2", "--max_new_tokens", "5")
    launch(base, tmp_path / "one", 1, *flags)
    launch(base, tmp_path / "two", 2, *flags)
    rows = [[json.loads(line) for line in open(tmp_path / out / "samples.jsonl")] for out in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 8  # before and after training, 2 prompts x 2 samples
    for a, b in zip(*rows):
        assert (a["step"], a["response_ids"]) == (b["step"], b["response_ids"])
        assert b["kl"] == pytest.approx(a["kl"], abs=1e-4)


def test_precomputed_reference_is_the_same_under_one_and_two_processes(base, single, tmp_path):
    from safetensors.torch import load_file

    caches = {}
    for n in (1, 2):
        caches[n] = tmp_path / f"cache{n}"
        launch(base, tmp_path / f"pre{n}", n, "--reference", "precomputed", "--ref_cache_dir", str(caches[n]))
    files = {n: sorted(os.listdir(caches[n])) for n in caches}
    assert files[1] == files[2] and len(files[1]) == 1  # the same key, written once (by the main process)
    values = {n: load_file(caches[n] / files[n][0])["reference_logps"] for n in caches}
    torch.testing.assert_close(values[2], values[1], atol=1e-5, rtol=0)
    assert_same_weights(tmp_path / "pre1", tmp_path / "pre2", atol=1e-5)
    assert_same_weights(single, tmp_path / "pre2", atol=1e-5)  # and the same training as the in-memory reference copy
    # a second 2-process run reads the cache the first one wrote
    rerun = launch(base, tmp_path / "pre2b", 2, "--reference", "precomputed", "--ref_cache_dir", str(caches[2]))
    assert "loaded from the cache" in rerun.stderr


def test_resume_under_two_processes_equals_the_uninterrupted_run(base, single, tmp_path):
    """Stop after step 1 (max_steps 1 writes no checkpoint, so stop with a signal-free cut: save at step 1 and
    delete the final model), then resume with 2 processes: the result is the uninterrupted single-process run."""
    out = tmp_path / "cut"
    launch(base, out, 2, "--save_steps", "1", "--eval_data", base[2])
    # keep only the step-1 checkpoint, as if the run had died right after writing it
    import shutil

    ckpts = out / "checkpoints"
    for name in os.listdir(ckpts):
        if name.startswith("step-") and name != "step-1":
            shutil.rmtree(ckpts / name)
    (ckpts / "latest").write_text("step-1")
    os.unlink(out / "model.safetensors")
    launch(base, out, 2, "--save_steps", "1", "--eval_data", base[2], "--resume")
    assert_same_weights(single, out, atol=1e-5)


def test_the_main_process_tokenizes_and_caches_the_data_and_the_others_read_it(base, tmp_path):
    cache = tmp_path / "cache"
    first = launch(base, tmp_path / "a", 2, "--data_cache_dir", str(cache), "--max_steps", "1")
    assert len(os.listdir(cache)) == 1 and "records tokenized, cached at" in first.stderr
    again = launch(base, tmp_path / "b", 2, "--data_cache_dir", str(cache), "--max_steps", "1")
    assert "train data: loaded from the cache" in again.stderr and len(os.listdir(cache)) == 1


def test_the_shipped_ddp_config_runs_on_cpu_and_equals_one_process(base, single, tmp_path):
    """configs/accelerate/ddp.yaml is written for GPUs; without one the processes run on CPU (gloo)."""
    launch(base, tmp_path / "acc", 2, "--eval_data", base[2], config="ddp.yaml")
    assert_same_weights(single, tmp_path / "acc", atol=1e-5)


ATOL = 1e-5 if GPUS == 0 else 1e-4  # fp32 on GPUs: TF32 and the reduce order, not bitwise


@pytest.mark.parametrize("launcher, reference", [("accelerate", "copy"), ("torchrun", "precomputed")])
def test_fsdp_shards_and_equals_one_process(base, single, tmp_path, launcher, reference):
    """FSDP2 on CPU (gloo) as on GPUs: `accelerate launch --config_file fsdp.yaml`, or torchrun with --strategy
    fsdp. Each process holds half the weights, and the result is one process's."""
    flags = ["--eval_data", base[2], "--reference", reference, "--ref_cache_dir", "off"]
    if launcher == "accelerate":
        result = launch(base, tmp_path / "f", 2, *flags, config="fsdp.yaml")
    else:
        result = launch(base, tmp_path / "f", 2, *flags, "--strategy", "fsdp")
    assert "fastdpo: FSDP2 over 2 processes" in result.stderr and "(50.0% of the" in result.stderr
    assert_same_weights(single, tmp_path / "f", atol=ATOL)
    results = [json.load(open(os.path.join(out, "results.json"))) for out in (single, tmp_path / "f")]
    for when in ("eval_before", "eval_after"):
        assert results[1][when]["loss"] == pytest.approx(results[0][when]["loss"], rel=1e-5)
    assert [line["step"] for line in train_lines(tmp_path / "f")] == [1, 2, 3]
    for a, b in zip(train_lines(single), train_lines(tmp_path / "f")):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_bf16_starts_at_ln2_with_no_margin_under_every_strategy(base, tmp_path):
    """The copy reference runs under the policy's precision: at step 0 they are the same function, so the loss is
    ln 2 and the margin 0 exactly (the log-probs stay float32). FSDP's final weights are as close to one
    process's as DDP's."""
    needs_deepspeed()
    bf16 = ["--precision", "bf16", "--eval_data", base[2]]
    launch(base, tmp_path / "one", 1, *bf16)
    launch(base, tmp_path / "ddp", 2, *bf16)
    logs = {"fsdp": launch(base, tmp_path / "fsdp", 2, *bf16, config="fsdp.yaml"),
            "zero2": launch(base, tmp_path / "zero2", 2, *bf16, config="deepspeed-zero2.yaml"),
            "zero3": launch(base, tmp_path / "zero3", 2, *bf16, "--strategy", "zero3")}
    sharded = ("fsdp", "zero2", "zero3")
    for name, result in logs.items():  # the reference in the compute dtype, sharded like the policy
        assert "the frozen reference holds its matmul weights in bfloat16" in result.stderr, name
    for name in ("one", "ddp", *sharded):
        before = json.load(open(tmp_path / name / "results.json"))["eval_before"]
        assert abs(before["loss"] - math.log(2)) < 1e-6 and abs(before["rewards/margins"]) < 1e-6, name
    from safetensors.torch import load_file

    one, ddp = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "ddp"))
    gap = lambda other: max((other[k] - one[k]).abs().max().item() for k in one)  # noqa: E731
    for name in sharded:
        weights = load_file(tmp_path / name / "model.safetensors")
        assert all(value.dtype == torch.float32 for value in weights.values()), name
        assert gap(weights) <= 1.25 * gap(ddp) + 1e-7, (name, gap(weights), gap(ddp))


def cut_to(out, step: int) -> None:
    """`out` as a crash right after its step-`step` checkpoint left it: later checkpoints and the model gone."""
    import shutil

    ckpts = out / "checkpoints"
    for name in os.listdir(ckpts):
        if name.startswith("step-") and name != f"step-{step}":
            shutil.rmtree(ckpts / name)
    (ckpts / "latest").write_text(f"step-{step}")
    os.unlink(out / "model.safetensors")


def test_fsdp_checkpoints_are_sharded_and_resume_exactly_with_any_number_of_processes(base, single, tmp_path):
    import shutil

    out = tmp_path / "f"
    launch(base, out, 2, "--eval_data", base[2], "--save_steps", "1", "--save_total_limit", "0", config="fsdp.yaml")
    shards = sorted(os.listdir(out / "checkpoints" / "step-1" / "sharded"))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shards
    from fastdpo.checkpoint import missing_shards

    step2 = out / "checkpoints" / "step-2" / "sharded"
    assert missing_shards(str(step2.parent), 2) == []
    os.rename(step2 / "__1_0.distcp", tmp_path / "elsewhere")  # as if process 1 had written on another machine
    assert missing_shards(str(step2.parent), 2) == ["sharded/__1_0.distcp"]
    os.rename(tmp_path / "elsewhere", step2 / "__1_0.distcp")
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp")]
    cut_to(out, 1)
    shutil.copytree(out, tmp_path / "one")
    launch(base, out, 2, "--eval_data", base[2], "--save_steps", "1", "--resume", config="fsdp.yaml")
    assert_same_weights(single, out, atol=ATOL)
    launch(base, tmp_path / "one", 1, "--eval_data", base[2], "--save_steps", "1", "--resume")  # one process
    assert_same_weights(single, tmp_path / "one", atol=ATOL)


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_kill_9_under_a_sharded_strategy_then_resume_equals_the_uninterrupted_run(base, single, tmp_path, strategy):
    """kill -9 of the launcher and its workers once the first checkpoint exists; the same command plus --resume."""
    import signal
    import time

    if strategy != "fsdp":
        needs_deepspeed()
    out = tmp_path / "k"
    args = two_workers(base, out, "--strategy", strategy, "--save_steps", "1", "--eval_data", base[2])
    env = worker_env()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "latest").exists() and not (out / "results.json").exists()  # killed mid-run
    launch(base, out, 2, "--strategy", strategy, "--save_steps", "1", "--eval_data", base[2], "--resume")
    assert_same_weights(single, out, atol=ATOL)


@pytest.mark.parametrize("strategy, shards", [("fsdp", "sharded/.metadata"),
                                              ("zero2", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt")])
def test_sigterm_under_a_sharded_strategy_writes_a_checkpoint_that_resumes(base, tmp_path, strategy, shards):
    """torchrun passes SIGTERM to its workers: they finish the step, write their shards, and stop together."""
    import signal
    import time

    if strategy != "fsdp":
        needs_deepspeed()
    out = tmp_path / "t"
    args = two_workers(base, out, "--strategy", strategy, "--max_steps", "300")
    env = worker_env()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and '"loss"' in (out / "metrics.jsonl").read_text()) \
            and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert "SIGTERM: stopped after step" in err, err[-2000:]
    step = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 0 < step < 300 and (out / "checkpoints" / f"step-{step}" / shards).is_file()
    assert not (out / "model.safetensors").exists()
    result = launch(base, out, 2, "--strategy", strategy, "--max_steps", str(step + 2), "--resume")
    assert f"resumed from {out}/checkpoints/step-{step} at step {step}" in result.stderr
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_a_full_disk_at_a_sharded_checkpoint_is_one_line_on_every_process(base, tmp_path, strategy):
    """A file-size limit (EFBIG) below one process's shard file: the save fails on the processes that hit it, every
    process stops with the same line (none is left waiting inside DeepSpeed's save), and no temporary directory
    is left."""
    import resource

    if strategy != "fsdp":
        needs_deepspeed()
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()  # the C++ op DeepSpeed compiles on first use, compiled (once) without the limit
    out = tmp_path / "full"
    args = two_workers(base, out, "--strategy", strategy, "--save_steps", "1", "--data_cache_dir", "off")
    env = worker_env()
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))  # noqa: E731  shards: ~0.5 MB
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    # the processes write to one stderr at once, so one line may run into the other: split at each error's start
    lines = ["fastdpo: error: " + part.split("\n")[0] for part in result.stderr.split("fastdpo: error: ")[1:]]
    assert result.returncode != 0 and len(lines) == 2 and lines[0] == lines[1], result.stderr[-3000:]
    assert "could not write the checkpoint of step 1" in lines[0] and "file-size limit" in lines[0]
    assert "no checkpoint was written before" in lines[0] and "CheckpointException" not in result.stderr
    assert not [n for r, d, f in os.walk(out) for n in d + f if n.startswith(".tmp-")]


def test_a_strategy_that_cannot_run_says_so(base, tmp_path):
    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text(open(os.path.join(CONFIGS, "fsdp.yaml")).read().replace("fsdp_version: 2", "fsdp_version: 1"))
    zero2_like = tmp_path / "grad_op.yaml"
    zero2_like.write_text(open(os.path.join(CONFIGS, "fsdp.yaml")).read().replace(
        "fsdp_version: 2", "fsdp_version: 2\n  fsdp_sharding_strategy: SHARD_GRAD_OP"))
    cases = [(["--precision", "fp16"], "fsdp.yaml", "--precision"),  # fp16 needs CUDA; under FSDP it is refused too
             (["--strategy", "ddp"], "fsdp.yaml", "--strategy ddp: the processes were launched with an accelerate "
                                                 "config for FSDP"),
             ([], str(fsdp1), "fsdp_version 1 is not supported yet; fastdpo shards with FSDP2"),
             ([], str(zero2_like), "fsdp_sharding_strategy SHARD_GRAD_OP is not supported yet; fastdpo shards fully "
                                   "(FULL_SHARD) or within each machine (HYBRID_SHARD)"),
             (["--lora_r", "4"], "fsdp.yaml", "--lora_r: not supported under FSDP yet")]
    try:
        import deepspeed  # noqa: F401  accelerate's launcher needs it to read a DeepSpeed config
        zero2 = open(os.path.join(CONFIGS, "deepspeed-zero2.yaml")).read()
        for name, before, after, flags, message in [
                ("stage1", "zero_stage: 2", "zero_stage: 1", [], "DeepSpeed zero_stage 1: fastdpo runs ZeRO stages 2 "
                                                                "and 3"),
                ("offload", "offload_optimizer_device: none", "offload_optimizer_device: cpu", [],
                 "DeepSpeed offload_optimizer_device cpu is not supported; set it to none"),
                ("clip", "zero_stage: 2", "zero_stage: 2\n  gradient_clipping: 0.5", [],
                 "DeepSpeed gradient_clipping 0.5 is not supported; fastdpo clips at --max_grad_norm (1.0)"),
                ("fp16", "zero_stage: 2", "zero_stage: 2", ["--precision", "bf16", "--strategy", "fsdp"],
                 "--strategy fsdp: the processes were launched with an accelerate config for DeepSpeed ZeRO-2")]:
            path = tmp_path / f"{name}.yaml"
            path.write_text(zero2.replace(before, after))
            cases.append((flags, str(path), message))
        ds_json = tmp_path / "ds.json"  # a DeepSpeed config file of its own, with an optimizer fastdpo would not use
        ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"},
                                       "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
        (tmp_path / "file.yaml").write_text(zero2.replace("  zero_stage: 2\n  offload_optimizer_device: none\n  "
                                                          "offload_param_device: none\n",
                                                          f"  deepspeed_config_file: {ds_json}\n"))
        cases.append(([], str(tmp_path / "file.yaml"), "DeepSpeed optimizer (in deepspeed_config_file) is not "
                                                       "supported; fastdpo sets it from --learning_rate"))
    except ImportError:
        pass
    for i, (flags, config, message) in enumerate(cases):
        result = launch(base, tmp_path / f"o{i}", 2, *flags, config=config, expect_code=1)  # torchrun's code
        assert message in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / f"o{i}").exists()
    launch(base, tmp_path / "ddp", 2, "--save_steps", "1", "--max_steps", "1")  # a checkpoint without FSDP
    before = sorted(os.listdir(tmp_path / "ddp" / "checkpoints" / "step-1"))
    result = launch(base, tmp_path / "ddp", 2, "--save_steps", "1", "--max_steps", "2", "--resume", config="fsdp.yaml",
                    expect_code=1)
    assert "was written without FSDP or DeepSpeed; resume it with DDP or one process" in result.stderr, \
        result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoints" / "step-1")) == before


def needs_deepspeed():
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:  # the dev extra installs it; a machine where it cannot be built skips these
        pytest.skip(f"DeepSpeed is not installed here ({e}): pip install -e '.[dev]'")


@pytest.mark.parametrize("launcher, stage, reference", [("accelerate", 2, "copy"), ("torchrun", 3, "copy"),
                                                        ("accelerate", 3, "precomputed")])
def test_deepspeed_shards_and_equals_one_process(base, single, tmp_path, launcher, stage, reference):
    """DeepSpeed ZeRO-2 and ZeRO-3 on CPU (gloo) as on GPUs, launched with accelerate's config or torchrun with
    --strategy zero2|zero3: micro-batches of 2 accumulated by the engine, the chunked lm_head (its weight
    partitioned under ZeRO-3), and the result is one process's."""
    needs_deepspeed()
    flags = ["--eval_data", base[2], "--reference", reference, "--ref_cache_dir", "off"]
    if launcher == "accelerate":
        result = launch(base, tmp_path / "d", 2, *flags, config=f"deepspeed-zero{stage}.yaml")
    else:
        result = launch(base, tmp_path / "d", 2, *flags, "--strategy", f"zero{stage}")
    assert f"fastdpo: DeepSpeed ZeRO-{stage} over 2 processes" in result.stderr
    assert "chunked lm_head" in result.stderr and "full logits" not in result.stderr
    assert_same_weights(single, tmp_path / "d", atol=ATOL)
    results = [json.load(open(os.path.join(out, "results.json"))) for out in (single, tmp_path / "d")]
    for when in ("eval_before", "eval_after"):
        assert results[1][when]["loss"] == pytest.approx(results[0][when]["loss"], rel=1e-5)
    for a, b in zip(train_lines(single), train_lines(tmp_path / "d"), strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "learning_rate"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_deepspeed_checkpoints_are_its_own_and_resume_exactly(base, single, tmp_path):
    """ZeRO-2 writes DeepSpeed's checkpoint (each process its optimizer partition) and resumes it exactly; a
    checkpoint is resumed only as it was written (stage, number of processes, strategy), else one line."""
    needs_deepspeed()
    out = tmp_path / "z"
    launch(base, out, 2, "--eval_data", base[2], "--save_steps", "1", "--save_total_limit", "0",
           config="deepspeed-zero2.yaml")
    files = sorted(os.listdir(out / "checkpoints" / "step-1" / "deepspeed"))
    assert files == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    from fastdpo.checkpoint import missing_shards

    assert missing_shards(str(out / "checkpoints" / "step-1"), 2) == []
    assert missing_shards(str(out / "checkpoints" / "step-1"), 3) == [
        "deepspeed/zero_pp_rank_2_mp_rank_00_optim_states.pt"]
    cut_to(out, 1)
    before = sorted(os.listdir(out / "checkpoints" / "step-1"))
    refusals = [(["--strategy", "zero3"], 2, "was written under DeepSpeed ZeRO-2; resume it with ZeRO-2"),
                (["--strategy", "zero2", "--batch_size", "6"], 3,  # 3 steps an epoch too
                 "was written by 2 DeepSpeed processes; resume it with 2"),
                (["--strategy", "fsdp"], 2, "was written under DeepSpeed; resume it under DeepSpeed"),
                ([], 1, "was written under DeepSpeed; resume it under DeepSpeed")]
    for flags, processes, message in refusals:
        result = launch(base, out, processes, "--eval_data", base[2], "--save_steps", "1", "--resume", *flags,
                        expect_code=1 if processes > 1 else 2)
        assert message in result.stderr, result.stderr[-2000:]
        assert sorted(os.listdir(out / "checkpoints" / "step-1")) == before
    launch(base, out, 2, "--eval_data", base[2], "--save_steps", "1", "--resume", "--strategy", "zero2")
    assert_same_weights(single, out, atol=ATOL)


@pytest.mark.parametrize("name, strategy", [("gpt2", "fsdp"), ("gpt2", "zero3"), ("gemma", "fsdp"),
                                            ("qwen2", "zero3"), ("mistral", "fsdp")])
def test_other_families_shard_and_equal_one_process(base, tmp_path, name, strategy):
    """GPT-2 (tied embeddings, Conv1D layers), Gemma (tied, scaled embeddings), Qwen2 and Mistral: the sharded run
    saves the keys one process saves (a tied lm_head once) with its values."""
    if strategy != "fsdp":
        needs_deepspeed()
    from test_checks import family

    from conftest import load_state
    from fastdpo.models import load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny")
    family(name, vocab=len(tokenizer) + 8).save_pretrained(tmp_path / "model")  # room for a family's own specials
    tokenizer.save_pretrained(tmp_path / "model")
    fam = (tmp_path, str(tmp_path / "model"), base[2])
    flags = ["--eval_data", base[2], "--max_steps", "2"]
    launch(fam, tmp_path / "one", 1, *flags)
    launch(fam, tmp_path / "two", 2, *flags, "--strategy", strategy)
    one, two = load_state(tmp_path / "one"), load_state(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=ATOL, rtol=0, msg=key)


def own_head_config(tmp_path, layers: str) -> str:
    """configs/accelerate/fsdp.yaml with these unit classes: with nn.Linear among them the lm_head is a unit of its
    own."""
    path = tmp_path / "own_head.yaml"
    path.write_text(open(os.path.join(CONFIGS, "fsdp.yaml")).read().replace(
        "fsdp_version: 2", f"fsdp_version: 2\n  fsdp_transformer_layer_cls_to_wrap: {layers}"))
    return str(path)


def test_an_lm_head_that_is_a_unit_of_its_own_keeps_the_chunked_head_and_equals_one_process(base, single, tmp_path):
    """Every nn.Linear an FSDP2 unit, the lm_head too: the chunked head gathers its weight through the unit (for
    the policy and the sharded copy reference) and reduce-scatters its gradient; the run is one process's."""
    result = launch(base, tmp_path / "f", 2, "--eval_data", base[2], "--reference", "copy",
                    config=own_head_config(tmp_path, "LlamaDecoderLayer,Linear"))
    assert "chunked lm_head" in result.stderr and "full logits" not in result.stderr, result.stderr[-2000:]
    assert_same_weights(single, tmp_path / "f", atol=ATOL)
    results = [json.load(open(os.path.join(out, "results.json"))) for out in (single, tmp_path / "f")]
    for when in ("eval_before", "eval_after"):
        assert results[1][when]["loss"] == pytest.approx(results[0][when]["loss"], rel=1e-5)
    for a, b in zip(train_lines(single), train_lines(tmp_path / "f")):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_a_tied_lm_head_cannot_be_a_unit_of_its_own(tmp_path):
    """GPT-2's lm_head shares its weight with the input embeddings, which stay in the root unit: one line."""
    from test_checks import family

    from fastdpo.models import load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny")
    family("gpt2", vocab=len(tokenizer) + 8).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    from conftest import example_rows, write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", example_rows(4))
    result = launch((tmp_path, str(tmp_path / "model"), data), tmp_path / "o", 2, "--max_steps", "1",
                    config=own_head_config(tmp_path, "GPT2Block,Linear"), expect_code=1)
    assert "fsdp_transformer_layer_cls_to_wrap: Linear would make the lm_head a unit of its own, but its weight is " \
           "tied to the input embeddings" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "o").exists()  # (torchrun prints its own traceback of the failed workers)


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_a_bf16_reference_under_fsdp_starts_exact_in_other_families(base, tmp_path, name):
    """GPT-2 (Conv1D layers, its lm_head tied to the embeddings: kept with them in float32) and Qwen2 (biased
    projections): under FSDP the frozen reference's bf16 matmul layers are units of their own, and step 0 is
    ln 2 with no margin."""
    from test_checks import family

    from fastdpo.models import load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny")
    family(name, vocab=len(tokenizer) + 8).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    result = launch((tmp_path, str(tmp_path / "model"), base[2]), tmp_path / "o", 2, "--precision", "bf16",
                    "--eval_data", base[2], "--max_steps", "1", "--strategy", "fsdp")
    assert "the frozen reference holds its matmul weights in bfloat16" in result.stderr
    before = json.load(open(tmp_path / "o" / "results.json"))["eval_before"]
    assert abs(before["loss"] - math.log(2)) < 1e-6 and abs(before["rewards/margins"]) < 1e-6


def test_hybrid_sharding_over_two_machines_equals_one_process_and_resumes_under_fsdp(base, single, tmp_path):
    """Two machines of one process each (two torchrun launches that meet at one address): HSDP replicates the
    weights across the machines and shards them within each; its sharded checkpoint resumes under FSDP2 on one
    machine of 2 processes, to the uninterrupted run's weights."""
    import socket

    root, model, data = base
    out = tmp_path / "h"
    with socket.socket() as sock:  # a free port for the two launches to meet on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = worker_env()
    machines = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                  "1", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port",
                                  str(port), "-m", "fastdpo", "train", "--model", model, "--data", data,
                                  "--output_dir", str(out), *FLAGS, "--strategy", "hsdp", "--save_steps", "1",
                                  "--save_total_limit", "0", "--eval_data", base[2]],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank in (0, 1)]
    results = [machine.communicate(timeout=600) for machine in machines]
    assert [m.returncode for m in machines] == [0, 0], results[0][1][-3000:]
    assert "HSDP (2 replicas, each sharded over 1 processes) over 2 processes" in results[0][1]
    assert_same_weights(single, out, atol=ATOL)
    cut_to(out, 1)
    launch(base, out, 2, "--eval_data", base[2], "--save_steps", "1", "--resume", "--strategy", "fsdp")
    assert_same_weights(single, out, atol=ATOL)


API_MODEL = """
import sys

import torch
from transformers import AutoModelForCausalLM

import fastdpo

model, data, out, strategy = sys.argv[1:5]
result = fastdpo.train(model=model, data=data, output_dir=out, strategy=strategy, batch_size=8, micro_batch_size=2,
                       max_steps=2, learning_rate=1e-3, progress=False)
if torch.distributed.get_rank() == 0:
    saved = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(20)[None]
    assert all(type(p) is torch.nn.Parameter for p in result.model.parameters())
    torch.testing.assert_close(result.model(ids).logits, saved(ids).logits, atol=0, rtol=0)
    print("plain model on the main process")
else:
    assert result.model is None
"""


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_the_python_api_returns_a_plain_trained_model_on_the_main_process(base, tmp_path, strategy):
    """Under FSDP and ZeRO-3 the policy holds shards; `fastdpo.train` gives the main process a whole, plain copy
    that computes what the saved model computes."""
    if strategy != "fsdp":
        needs_deepspeed()
    script = tmp_path / "api.py"
    script.write_text(API_MODEL)
    root, model, data = base
    env = worker_env()
    result = subprocess.run([*TORCHRUN_2, str(script), model, data, str(tmp_path / "out"), strategy],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and "plain model on the main process" in result.stdout, result.stderr[-3000:]


MAIN_READS = """
import os
import sys

import safetensors

opened = safetensors.safe_open


def safe_open(path, *args, **kwargs):  # the weights are there for the main process only
    if os.environ["RANK"] != "0" and str(path).endswith("model.safetensors") and "/model/" in str(path):
        raise PermissionError(f"process {os.environ['RANK']} may not read {path}")
    return opened(path, *args, **kwargs)


safetensors.safe_open = safe_open
import safetensors.torch  # noqa: E402

safetensors.torch.safe_open = safe_open
from fastdpo.cli import main  # noqa: E402

main(sys.argv[1:])
"""


def lora_adapter(model: str, out) -> str:
    """A LoRA adapter directory of `model` with non-zero weights (a reference that differs from the policy)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("strategy, reference", [("fsdp", "copy"), ("fsdp", "precomputed"), ("zero3", "copy"),
                                                 ("zero3", "precomputed"), ("fsdp", "adapter")])
def test_under_fsdp_and_zero3_only_the_main_process_reads_the_weights(base, single, tmp_path, strategy, reference):
    """The other processes build the model on the meta device and receive their shards (a process other than the
    main one that opened the weights file would fail here); the result is one process's. Precomputed reference
    log-probs come from the sharded starting policy, each process scoring its share of the pairs (17: a share
    padded to 9), under the cache key one process gives them. A --ref_model that is a LoRA adapter directory
    (its base with the adapter merged in) is read by the main process only too."""
    if strategy == "zero3":
        needs_deepspeed()
    script = tmp_path / "main_reads.py"
    script.write_text(MAIN_READS)
    root, model, data = base
    env = worker_env()
    flags = ["--reference", reference, "--ref_cache_dir", str(tmp_path / "cache2")]
    if reference == "adapter":  # under the guarded directory: only the main process may read it
        adapter = lora_adapter(model, tmp_path / "model" / "ref-adapter")
        flags = ["--ref_model", adapter]
        single = tmp_path / "one"
        launch(base, single, 1, "--eval_data", base[2], *flags)
    args = [*TORCHRUN_2, str(script),
            "train", "--model", model, "--data", data, "--output_dir", str(tmp_path / "f"), *FLAGS,
            "--strategy", strategy, "--eval_data", base[2], *flags]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    how = {"fsdp": "FSDP2", "zero3": "DeepSpeed ZeRO-3"}[strategy]
    assert f"fastdpo: {how}: the main process loads the weights; the other 1 build the model on the meta device" \
        in result.stderr
    assert_same_weights(single, tmp_path / "f", atol=ATOL)
    if reference == "precomputed":
        from safetensors.torch import load_file

        assert "reference log-probs for 17 train pairs: computed" in result.stderr
        launch(base, tmp_path / "one", 1, "--reference", "precomputed", "--ref_cache_dir", str(tmp_path / "cache1"),
               "--max_steps", "1")
        files = {n: sorted(os.listdir(tmp_path / f"cache{n}")) for n in (1, 2)}
        assert files[1] == files[2] and len(files[1]) == 1, files  # the eval set is the train set: one key
        values = [load_file(tmp_path / f"cache{n}" / files[n][0])["reference_logps"] for n in (1, 2)]
        torch.testing.assert_close(values[1], values[0], atol=1e-5, rtol=0)
    env["RANK"] = "1"  # the guard itself: process 1 cannot load the model alone
    alone = subprocess.run([sys.executable, str(script), "train", "--model", model, "--data", data, "--output_dir",
                            str(tmp_path / "alone"), *FLAGS], capture_output=True, text=True, env=env, timeout=600)
    assert alone.returncode != 0 and "may not read" in alone.stderr, alone.stderr[-2000:]


SKIPPING = """
import sys
from fastdpo.cli import main
from fastdpo.losses import LOSSES, Loss, sigmoid

calls = [0]


def nan_in_step_2(pc, pr, rc, rr, *, beta):  # each process scores 2 micro-batches a step
    calls[0] += 1
    losses = sigmoid(pc, pr, rc, rr, beta=beta)
    return losses * float("nan") if calls[0] in (3, 4) else losses


def inf_grad_in_step_2(pc, pr, rc, rr, *, beta):  # a finite loss whose gradients are not: d sqrt(x) / dx at 0
    calls[0] += 1
    losses = sigmoid(pc, pr, rc, rr, beta=beta)
    return losses + (pc - pc.detach()).sqrt() if calls[0] in (3, 4) else losses


LOSSES["nan_in_step_2"] = Loss(nan_in_step_2)
LOSSES["inf_grad_in_step_2"] = Loss(inf_grad_in_step_2)
main(sys.argv[1:])
"""


@pytest.mark.parametrize("loss, strategies", [("nan_in_step_2", ("ddp", "zero2")),
                                              ("inf_grad_in_step_2", ("ddp", "zero2", "zero3", "fsdp"))])
def test_a_non_finite_step_under_a_sharded_strategy_is_skipped_as_under_ddp(base, tmp_path, loss, strategies):
    """Step 2's loss is NaN, or finite with infinite gradients: its update is skipped (the accumulated gradients
    dropped, the optimizer state left as it was), and the run goes on exactly as DDP's does."""
    needs_deepspeed()
    script = tmp_path / "skipping.py"
    script.write_text(SKIPPING)
    root, model, data = base
    env = worker_env()
    for strategy in strategies:
        args = [*TORCHRUN_2, str(script),
                "train", "--model", model, "--data", data, "--output_dir", str(tmp_path / strategy), *FLAGS,
                "--loss", loss, "--strategy", strategy, "--epochs", "2"]
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "step 2: non-finite loss or gradients, update skipped" in result.stderr, strategy
        assert [line["skipped_steps"] for line in train_lines(tmp_path / strategy)] == [0, 1, 1, 1, 1, 1], strategy
    for strategy in strategies[1:]:
        assert_same_weights(tmp_path / "ddp", tmp_path / strategy, atol=ATOL)


def test_every_shipped_accelerate_config_loads_and_is_documented():
    from accelerate.commands.config.config_args import load_config_from_file

    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8").read()
    names = sorted(os.listdir(CONFIGS))
    assert names == ["ddp.yaml", "deepspeed-zero2.yaml", "deepspeed-zero3.yaml", "fsdp.yaml"]
    for name in names:
        config = load_config_from_file(os.path.join(CONFIGS, name))
        assert config.num_processes == 2 and config.mixed_precision == "no", name
        assert f"configs/accelerate/{name}" in readme, name
    assert load_config_from_file(os.path.join(CONFIGS, "fsdp.yaml")).fsdp_config["fsdp_version"] == 2
    stages = [load_config_from_file(os.path.join(CONFIGS, n)).deepspeed_config["zero_stage"] for n in names[1:3]]
    assert stages == [2, 3]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_unshard_inverts_shard_for_uneven_lengths(world):
    from fastdpo.runtime import Processes

    items = list(range(11))
    shards = [Processes(rank, world).shard(items) for rank in range(world)]
    assert sorted(len(s) for s in shards)[-1] - sorted(len(s) for s in shards)[0] <= 1
    assert Processes(0, world).unshard(shards) == items


def test_pooled_means_weight_each_process_by_its_pairs():
    """Process A: 3 pairs with mean loss 1.0; B: 1 pair with loss 3.0; C: none -> (3 * 1 + 1 * 3) / 4 = 1.5."""
    from fastdpo.metrics import pooled_means

    pooled = pooled_means([{"loss": 1.0, "pairs": 3}, {"loss": 3.0, "pairs": 1}, {"pairs": 0}])
    assert pooled == {"loss": 1.5, "pairs": 4}


@pytest.mark.parametrize("n, world, micro", [(5, 2, 2), (1, 2, 2), (8, 2, 2), (7, 3, 1), (3, 1, 2)])
def test_every_process_runs_the_same_number_of_micro_batches(n, world, micro):
    """FSDP gathers weights in every forward, so all processes must run as many; the padding ones have scale 0 and
    every real pair is scored exactly once, with scale world / n (DDP then averages over the processes)."""
    from fastdpo.runtime import Processes

    positions = list(range(100, 100 + n))
    per_rank = [Processes(rank, world).micro_batches(positions, micro) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1
    real = [i for batches in per_rank for chunk, scale in batches if scale for i in chunk]
    assert sorted(real) == positions
    assert all(scale in (0.0, world / n) and len(chunk) <= micro for b in per_rank for chunk, scale in b)
