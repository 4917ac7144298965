"""Data parallelism on CPU (gloo): DDP and DeepSpeed ZeRO-2/3 across 2 processes follow the 1-process loss
trajectory; checkpoints resume on another rank count; a 2-node launch runs a recipe; bad input fails first.

Cost on the 2-core CI machine: the 2-rank launch ~25 s, the resume ~10 s, the 2-node recipe run ~45 s
(process start-up and imports dominate; each training step takes milliseconds).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_worker as worker
from draftkit import preflight
from draftkit.engine.batches import BatchStream
from draftkit.engine.distributed import DistributedConfigError, DistributedSettings, frozen_dtype, validate_hostfile

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
# Two ranks reduce sums in a different order than one process; measured differences are below 1e-6.
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "tests")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(*args, nproc=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), *map(str, args)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _report(out: Path, scenario: str, rank: int = 0) -> dict:
    return json.loads((out / f"{scenario}.rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    _torchrun(WORKER, "--out", out, "--scenarios", "ddp,ddp_zero2,ddp_zero3")
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return worker.run_scenario("ddp", tmp_path_factory.mktemp("one"), world_size=1)


@pytest.mark.parametrize("scenario", ["ddp", "ddp_zero2", "ddp_zero3"])
def test_two_ranks_follow_the_one_process_trajectory(two_ranks, one_process, scenario):
    """Same global batch (1 x 4 vs 2 x 2 examples, uneven token counts per rank): same losses, grad norms, weights."""
    report = _report(two_ranks, scenario)
    assert report["world_size"] == 2
    assert report["losses"] == pytest.approx(one_process["losses"], abs=TOLERANCE)
    assert report["grad_norms"] == pytest.approx(one_process["grad_norms"], abs=TOLERANCE)
    assert report["weight_sum"] == pytest.approx(one_process["weight_sum"], rel=1e-6)
    assert report["losses"][-1] < report["losses"][0]
    assert report["draft_forward_ok"]


def test_zero3_partitions_the_frozen_target_and_returns_a_whole_draft(two_ranks):
    for rank in (0, 1):
        report = _report(two_ranks, "ddp_zero3", rank)
        assert report["target_elements_local"] * 2 == report["target_elements_total"]
        assert report["draft_forward_ok"]
    assert _report(two_ranks, "ddp_zero2")["target_elements_local"] == _report(two_ranks, "ddp_zero2")["target_elements_total"]


def test_resume_on_another_rank_count_and_zero_stage(two_ranks, tmp_path):
    """A ZeRO-3 checkpoint written by 2 ranks at step 3 resumes in 1 process under ZeRO-2 and continues the curve."""
    saved = two_ranks / "ddp_zero3" / "checkpoints" / "step_000003"
    state = json.loads((saved / "state.json").read_text())
    assert state["world_size"] == 2
    shutil.copytree(saved, tmp_path / "ddp_zero2" / "checkpoints" / "step_000003")
    proc = subprocess.run([sys.executable, str(WORKER), "--out", str(tmp_path), "--scenarios", "ddp_zero2"],
                          env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = _report(tmp_path, "ddp_zero2")
    assert resumed["world_size"] == 1 and resumed["resumed_from"] == 3
    uninterrupted = _report(two_ranks, "ddp_zero3")
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"], abs=TOLERANCE)
    assert resumed["weight_sum"] == pytest.approx(uninterrupted["weight_sum"], rel=1e-6)


def test_simulated_two_node_launch_runs_a_recipe_to_completion(tmp_path):
    """2 node ranks x 1 process on one host, torchrun's static rendezvous, ZeRO-2, the tiny FastDraft recipe."""
    port, run_dir = _free_port(), tmp_path / "run"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node",
         "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "draftkit.train", "+recipe=fastdraft",
         "+debug=tiny", "dist=zero2", "eval.before=false", "eval.measure_speedup=false", f"hydra.run.dir={run_dir}"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert (run_dir / "export" / "model.safetensors").is_file()
    for stage in ("pretrain", "finetune"):
        state = json.loads((run_dir / stage / "checkpoints" / "step_000003" / "state.json").read_text())
        assert state["world_size"] == 2 and state["settings"]["distributed"]["zero_stage"] == 2
    # rank 0 generated the target's answers once; rank 1 read them from the cache instead of appending its own
    assert len((run_dir / "selfdistill.jsonl").read_text().splitlines()) == 6


def test_two_ranks_split_distillspecs_teacher_rounds(tmp_path):
    """The tiny DistillSpec recipe on 2 ranks, the target writing: 4 prompts, 2 per rank and micro-batch, so every
    micro-step is a round of its own and each rank writes only the 2 prompts it reads in it (6 over 3 steps, not 12),
    none outside the plan."""
    port, run_dir = _free_port(), tmp_path / "run"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "-m", "draftkit.train", "+recipe=distillspec", "+debug=tiny", "dist=zero2",
         "eval=none", "distillspec.num_prompts=4", "distillspec.generation.max_new_tokens=6",
         f"hydra.run.dir={run_dir}"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:]
    timing = json.loads((run_dir / "result.json").read_text())["timing"]
    assert (timing["teacher_prompts_written"], timing["teacher_prompts_unplanned"]) == (6, 0)
    state = json.loads((run_dir / "distill" / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["world_size"] == 2


def test_zero3_head_recipe_partitions_the_target_over_two_ranks(tmp_path):
    """The real hydra_heads recipe under dist=zero3 on 2 ranks: the frozen target is split between the ranks, the
    heads (which read the target's LM head weight directly) still train, and both ranks evaluate in lockstep."""
    run_dir = tmp_path / "run"
    _torchrun("-m", "draftkit.train", "+recipe=hydra_heads", "+debug=tiny", "dist=zero3", "logger=jsonl",
              "eval.before=false", "eval.measure_speedup=false", f"hydra.run.dir={run_dir}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    held, total = rows[0]["hydra_heads/frozen_param_elements_this_rank"], rows[0]["hydra_heads/frozen_param_elements_total"]
    assert held == total // 2
    losses = [r["hydra_heads/loss"] for r in rows if "hydra_heads/loss" in r]
    assert len(losses) == 3 and all(0 < loss < 100 for loss in losses)
    result = json.loads((run_dir / "result.json").read_text())
    # every rank decoded every evaluation prompt (one per category of the bundled set) in lockstep
    assert [report["overall"]["prompts"] for report in result["after"].values()] == [4, 4]
    assert (run_dir / "export" / "draftkit.json").is_file()


def test_two_ranks_share_fspads_self_distilled_answers(tmp_path):
    """The tiny FSPAD recipe on 2 ranks: rank 0 answers the prompts once and the other rank reads its cache (each rank
    generating and appending to the same file would double it), then both train and rank 0 exports."""
    run_dir = tmp_path / "run"
    _torchrun("-m", "draftkit.train", "+recipe=fspad", "+debug=tiny", "eval=none", f"hydra.run.dir={run_dir}")
    assert len((run_dir / "selfdistill.jsonl").read_text().splitlines()) == 6
    state = json.loads((run_dir / "train" / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["world_size"] == 2
    assert (run_dir / "export" / "draftkit.json").is_file()


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear error before any process starts work.

def test_hostfile_naming_no_slots_stops_the_launch_script_before_deepspeed_starts(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-001 slots=8\nnode-002\n")
    env = {**_env(), "HOSTFILE": str(hostfile), "PYTHON": sys.executable, "PATH": "/nonexistent"}  # no `deepspeed`
    proc = subprocess.run(["/bin/bash", str(ROOT / "launch" / "deepspeed_hostfile.sh"), "+recipe=fastdraft",
                           "dist=zero2"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "line 2: 'node-002' names no slots. Fix: write `node-002 slots=<GPUs on that host>`" in proc.stderr
    assert "Traceback" not in proc.stderr and "command not found" not in proc.stderr  # deepspeed was never reached


@pytest.mark.parametrize("text, message", [
    ("", "names no hosts"),
    ("# only a comment\n", "names no hosts"),
    ("a slots=0\n", "needs slots >= 1"),
    ("a slots=2\na slots=2\n", "listed twice"),
])
def test_hostfile_errors(tmp_path, text, message):
    (tmp_path / "h").write_text(text)
    with pytest.raises(DistributedConfigError, match=message):
        validate_hostfile(tmp_path / "h")
    (tmp_path / "ok").write_text("a slots=2  # comment\n\nb slots=4\n")
    assert validate_hostfile(tmp_path / "ok") == {"a": 2, "b": 4}


def test_deepspeed_config_conflicting_with_the_recipe_is_one_error(tmp_path, capsys):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "optimizer": {"type": "AdamW"},
                                  "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}))
    assert preflight.main(["--world-size", "2", "+recipe=fastdraft", "dist=zero2", f"dist.config_file={config}"]) == 2
    err = capsys.readouterr().err
    assert err.count("draftkit.preflight:") == 1
    for expected in ("defines `optimizer`", "train_micro_batch_size_per_gpu=16 but engine.micro_batch_size=4",
                     "zero_optimization.stage=3 but dist.zero_stage=2", "bf16.enabled=True but engine.precision=fp32"):
        assert expected in err


def test_zero3_with_a_feature_cache_is_refused_by_the_training_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "draftkit.train", "+recipe=fspad", "+debug=tiny", "dist=zero3",
                           "fspad.features.source=offline", f"hydra.run.dir={tmp_path}"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "fspad.features.source=offline: a feature cache" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "config.yaml").exists()  # nothing was started


@pytest.mark.parametrize("head, chunk, one_process_losses", [("frozen", 2048, [22.8203, 22.8122, 22.8078]),
                                                             ("trained", 2048, [22.8203, 22.8076, 22.7994]),
                                                             ("trained", "null", [22.8203, 22.8076, 22.7994])])
def test_eagle3_trains_under_zero3_as_in_one_process(tmp_path, head, chunk, one_process_losses):
    # ZeRO-3 leaves the head's weight empty outside the drafter's forward, so the loss is scored inside it: the chunked
    # loss reads the weight directly (the trained head's gradient too), the plain one calls the head as a module. The
    # losses are the one-process run's.
    proc = subprocess.run([sys.executable, "-m", "draftkit.train", "+recipe=eagle3", "+debug=tiny", "eval=none",
                           "dist=zero3", f"eagle3.loss_chunk_size={chunk}", f"eagle3.lm_head={head}",
                           f"hydra.run.dir={tmp_path}"], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "train" / "history.json").read_text())
    assert [h["loss"] for h in history] == pytest.approx(one_process_losses, abs=1e-4)


def test_shipped_launch_configs_pass_the_preflight(capsys):
    assert preflight.main(["--hostfile", str(ROOT / "launch" / "hostfile.example"), "+recipe=fastdraft", "dist=zero3",
                           f"dist.config_file={ROOT / 'launch' / 'deepspeed' / 'zero3_tuning.json'}"]) == 0
    out = capsys.readouterr().out
    assert "2 node(s), 16 slot(s)" in out and "fastdraft.finetune.engine: deepspeed ZeRO-3" in out


@pytest.mark.parametrize("settings, message", [
    ({"backend": "deepspeed", "zero_stage": 0}, "ZeRO stage 1, 2 or 3"),
    ({"backend": "accelerate", "zero_stage": 2}, "needs dist.backend=deepspeed"),
    ({"backend": "deepspeed", "zero_stage": 2, "offload_params": "cpu"}, "only ZeRO-3"),
    ({"backend": "accelerate", "offload_optimizer": "cpu"}, "DeepSpeed ZeRO feature"),
    ({"backend": "fsdp"}, "dist.backend='fsdp'"),
])
def test_impossible_dist_settings_are_errors(settings, message):
    with pytest.raises(DistributedConfigError, match=message):
        DistributedSettings(**settings)


@pytest.mark.parametrize("settings, precision, expected", [
    ({}, "bf16", None),  # DDP autocasts: the target keeps the dtype it was loaded in
    ({"backend": "deepspeed", "zero_stage": 3}, "fp32", None),
    # DeepSpeed's bf16 engine holds the draft in bf16 without autocast: what feeds it must be bf16 too.
    ({"backend": "deepspeed", "zero_stage": 2}, "bf16", torch.bfloat16),
    ({"backend": "deepspeed", "zero_stage": 3, "frozen_dtype": "float32"}, "bf16", torch.float32),
    ({"frozen_dtype": "bfloat16"}, "fp32", torch.bfloat16),
])
def test_frozen_modules_run_in_the_dtype_the_trained_ones_see(settings, precision, expected):
    assert frozen_dtype(DistributedSettings(**settings), precision) == expected


def test_data_position_translates_to_another_global_batch():
    data = list(range(16))
    two_ranks = BatchStream(data, 2, list, seed=3, rank=0, world_size=2)
    for _ in range(3):
        two_ranks.next()
    one = BatchStream(data, 4, list, seed=3)
    one.load_state_dict(two_ranks.state_dict())
    two_ranks_rank1 = BatchStream(data, 2, list, seed=3, rank=1, world_size=2)
    two_ranks_rank1.load_state_dict(two_ranks.state_dict())
    assert sorted(one.next()) == sorted(two_ranks.next() + two_ranks_rank1.next())
