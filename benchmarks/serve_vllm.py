"""Serve every exportable draft family in vLLM and check it against plain vLLM and against draftkit's own runtime.

For each family that vLLM loads (a standalone draft LM through `"method": "draft_model"`, Medusa heads through vLLM's
Medusa format, EAGLE-1 through the fspad recipe's `eagle-vllm/` folder, and EAGLE-3 once `+recipe=eagle3` exists) it
  1. trains a small real draft on the default target with the family's own recipe (the target's own answers to the same
     ShareGPT/GSM8K prompts, generated once and copied into every run), and exports the same recipe's untrained draft
     (0 steps) as the baseline a trained draft must clearly beat;
  2. serves target + exported draft with vLLM's offline `LLM(...)` API, one held-out Spec-Bench prompt at a time,
     greedy, in fp32, with per-request speculative-decoding metrics (`per_request_spec_decode_metrics="detailed"`);
  3. checks that every greedy output equals plain vLLM's, token for token;
  4. compares vLLM's acceptance by draft position with `python -m draftkit.eval` on the same prompts and export:
     α_i = accepted at position i / reached position i, τ per verification step, per prompt and pooled, with binomial
     standard errors;
  5. checks the served export the way a serving container sees it: config keys the loaders read (context length,
     EAGLE attention bias, no stored copy of the target's embedding), and mode bits readable by another user.

vLLM lives in its own virtual environment (its torch pin and its PyPI torchvision break draftkit's; see
launch/vllm.md); this script runs in draftkit's and starts `--vllm-python <venv>/bin/python serve_vllm.py --worker`
once per served configuration. The worker imports only vLLM and the standard library.

    DRAFTKIT_SHARED_DATA=<shared>/data python benchmarks/serve_vllm.py --work /tmp/serve_vllm \\
        --vllm-python /work/vllm-venv/bin/python --out benchmarks/results [--families draft_model,medusa,eagle1]

Everything is resumable: finished training runs, draftkit evaluations and vLLM runs are reused when their settings
match. Writes serve_vllm_<target>_<machine>_<date>.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

EOS_NOTE = "outputs compared with a trailing end-of-turn token removed (vLLM leaves stop tokens out of token_ids)"

# Budgets: the same data for every family, steps per family sized for a few CPU minutes each.
CPU = {
    "train": ["data.selfdistill.num_prompts=256", "data.selfdistill.max_new_tokens=128",
              "data.selfdistill.batch_size=32", "data.max_length=512", "logger=jsonl", "engine.log_every=10",
              "engine.save_every=50", "eval.enabled=false"],
    "limit_per_category": 3, "categories": None, "max_new_tokens": 96, "max_model_len": 4096,
    "steps": {"draft_model": 150, "medusa": 200, "eagle1": 200, "eagle3": 200},
}
# A pipeline check on a tiny random target (seconds of training), saved for vLLM, which loads it as a real Llama; its
# head size is 64 because vLLM's CPU attention takes only common head sizes.
SMOKE_TARGET = {"hidden_size": 128, "num_heads": 2, "num_kv_heads": 2}
SMOKE = {
    "train": ["target=tiny", "target.hidden_size=128", "+target.num_heads=2", "+target.num_kv_heads=2",
              "draft.num_layers=1", "data.prompts_limit=40", "data.selfdistill.num_prompts=8",
              "data.selfdistill.max_new_tokens=16", "data.selfdistill.batch_size=8", "data.max_length=256",
              "logger=jsonl", "engine.micro_batch_size=2", "engine.warmup_steps=1", "engine.log_every=1",
              "eval.enabled=false"],
    # The byte tokenizer makes summarization and RAG prompts longer than the tiny target's 2048 positions.
    "limit_per_category": 1, "categories": ["translation", "qa"], "max_new_tokens": 16,
    "max_model_len": 2048,
    "steps": {"draft_model": 3, "medusa": 3, "eagle1": 3, "eagle3": 3},
}


def _draft_model_artifact(result: dict) -> str:
    return result["export"]


def _medusa_artifact(result: dict) -> str:
    return result["export"]["vllm"]


def _eagle1_artifact(result: dict) -> str:
    return result["exports"]["eagle-vllm"]


def _eagle3_artifact(result: dict) -> str:
    # Hook for the EAGLE-3 recipe (speculators format, which vLLM reads from its config.json): its result.json is
    # expected to name the folder under exports["speculators"]; adjust here if the recipe records it elsewhere.
    return result["exports"]["speculators"]


# family -> recipe overrides, the key that sets its training steps, where its vLLM artifact is, vLLM's method,
# draft tokens per step, and the draftkit.eval arguments that decode it the way vLLM does (a chain).
FAMILIES = {
    "draft_model": {"overrides": ["+recipe=fastdraft", "fastdraft.stages=[finetune]", "draft=from_target"],
                    "steps_key": "fastdraft.finetune.engine.steps", "artifact": _draft_model_artifact,
                    "method": "draft_model", "gamma": 5, "eval": ["--gamma", "5"]},
    "medusa": {"overrides": ["+recipe=medusa", "medusa.export.formats=[vllm]"],
               "steps_key": "engine.steps", "artifact": _medusa_artifact,
               "method": "medusa", "gamma": 4, "eval": ["--tree", "chain"]},
    "eagle1": {"overrides": ["+recipe=fspad", "fspad.feature_sampling=false", "fspad.partial_alignment=false",
                             "fspad.tree.kind=none"],
               "steps_key": "fspad.train.engine.steps", "artifact": _eagle1_artifact,
               "method": "eagle", "gamma": 5, "eval": ["--tree", "chain", "--gamma", "5"]},
    "eagle3": {"overrides": ["+recipe=eagle3"], "steps_key": "engine.steps", "artifact": _eagle3_artifact,
               "method": "eagle3", "gamma": 5, "eval": ["--gamma", "5"], "needs_recipe": "eagle3"},
}
VLLM_SETTINGS = {
    # What vLLM needed on a 2-core, 24 GiB CPU machine (launch/vllm.md): a KV-cache share it can allocate, no
    # compilation (startup 359 s -> about 25 s), and fp32 so greedy outputs are comparable with draftkit's fp32 runtime.
    "dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.15, "seed": 0,
}


# ----------------------------------------------------------------------------------------------------------------
# The vLLM side: runs under --vllm-python, imports vLLM and the standard library only.

def worker(job_file: Path) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    job = json.loads(Path(job_file).read_text())
    started = time.perf_counter()
    from vllm import LLM, SamplingParams

    kwargs = dict(job["settings"], model=job["target"], disable_log_stats=False)
    if job.get("speculative_config"):
        kwargs.update(speculative_config=job["speculative_config"], per_request_spec_decode_metrics="detailed")
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], stop_token_ids=job["stop_token_ids"])
    rows = []
    decode_start = time.perf_counter()
    for prompt in job["prompts"]:  # one at a time: batch 1, as draftkit's runtime decodes
        t0 = time.perf_counter()
        output = llm.generate([{"prompt_token_ids": prompt["ids"]}], params, use_tqdm=False)[0].outputs[0]
        metrics = output.spec_decode_metrics
        rows.append({"question_id": prompt["question_id"], "tokens": list(output.token_ids),
                     "finish_reason": output.finish_reason, "time_s": time.perf_counter() - t0,
                     "spec": None if metrics is None else {
                         "per_step_accepted": list(metrics.per_step_accepted),
                         "per_step_drafted": list(metrics.per_step_drafted),
                         "histogram": list(metrics.histogram), "num_draft_tokens": metrics.num_draft_tokens}})
    counters = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            counters[metric.name] = getattr(metric, "values", getattr(metric, "value", None))
    import vllm

    Path(job["out"]).write_text(json.dumps({
        "vllm_version": vllm.__version__, "startup_s": startup_s, "decode_s": time.perf_counter() - decode_start,
        "rows": rows, "spec_decode_counters": counters, "kwargs": {k: v for k, v in kwargs.items()}}, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# The draftkit side.

def run_logged(command: list[str], log: Path, env: dict | None = None) -> None:
    print("+", shlex.join(command), flush=True)
    with open(log, "a") as f:
        f.write(f"\n+ {shlex.join(command)}\n")
        f.flush()
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"command failed ({done.returncode}); see {log}:\n  {shlex.join(command)}")


def recipe_exists(name: str) -> bool:
    from importlib import resources

    return resources.files("draftkit.conf").joinpath("recipe", f"{name}.yaml").is_file()


def train(family: str, steps: int, run_dir: Path, budget: dict, data_root: str, shared_answers: Path,
          log: Path, reexport: bool = False) -> dict:
    """Train one family with its recipe (resumed or skipped when the same command finished before); steps=0 exports
    the untrained draft, the baseline a trained one must clearly beat (one step at lr 0, which leaves every weight as
    initialised: the loop takes at least one step). `reexport` runs a finished recipe again, which
    trains nothing and writes its export with this draftkit (the record keeps the training's wall time)."""
    spec = FAMILIES[family]
    command = [sys.executable, "-m", "draftkit.train", *spec["overrides"], "data=shared", f"data.root={data_root}",
               *budget["train"], f"{spec['steps_key']}={max(steps, 1)}", *(["engine.lr=0"] if steps == 0 else []),
               f"hydra.run.dir={run_dir}"]
    record_file = run_dir / "serve_vllm_train.json"
    earlier = json.loads(record_file.read_text()) if record_file.is_file() else None
    if (run_dir / "result.json").is_file() and earlier and earlier["command"] == shlex.join(command):
        if not reexport:
            return earlier
        run_logged(command, log)  # finished: the recipe resumes at its last step and writes the export again
        return {**earlier, "reexported": time.strftime("%Y-%m-%d")}
    run_dir.mkdir(parents=True, exist_ok=True)
    if shared_answers.is_file() and not (run_dir / "selfdistill.jsonl").is_file():
        shutil.copy(shared_answers, run_dir / "selfdistill.jsonl")  # the same self-distilled answers for every family
    start = time.perf_counter()
    run_logged(command, log)
    if not shared_answers.is_file() and (run_dir / "selfdistill.jsonl").is_file():
        shutil.copy(run_dir / "selfdistill.jsonl", shared_answers)
    record = {"command": shlex.join(command), "wall_s": time.perf_counter() - start}
    record_file.write_text(json.dumps(record))
    return record


def eval_summary(report: dict) -> dict:
    """Pooled counts of a draftkit report in vLLM's terms: verification steps that carried a draft, accepted draft
    tokens at each position, and the positions reached."""
    rows = report["prompts"]
    gamma = report["config"]["gamma"]
    accepted = [sum(r["accepted_per_position"][i] for r in rows) for i in range(gamma)]
    reached = [sum(r["proposed_per_position"][i] for r in rows) for i in range(gamma)]
    steps = sum(r["proposed_per_position"][0] for r in rows)
    return {"prompts": len(rows), "new_tokens": report["overall"]["new_tokens"], "draft_steps": steps,
            "accepted_per_position": accepted, "reached_per_position": reached,
            "alpha": [a / n if n else None for a, n in zip(accepted, reached)],
            "accepted_per_step": sum(accepted) / steps if steps else None,
            "tau_draftkit": report["overall"]["tau"], "target_forwards": report["overall"]["target_forwards"],
            "per_prompt_accepted": {str(r["question_id"]): sum(r["accepted_per_position"]) for r in rows},
            "per_prompt_steps": {str(r["question_id"]): r["proposed_per_position"][0] for r in rows}}


def vllm_summary(result: dict, gamma: int) -> dict:
    """The same counts from vLLM's per-request metrics: a step that accepted j drafts reached positions 1..j+1."""
    accepted, reached = [0] * gamma, [0] * gamma
    steps, per_prompt, per_prompt_steps = 0, {}, {}
    for row in result["rows"]:
        total = 0
        for j, drafted in zip(row["spec"]["per_step_accepted"], row["spec"]["per_step_drafted"]):
            steps += 1
            total += j
            for i in range(min(j + 1, drafted, gamma)):
                reached[i] += 1
            for i in range(j):
                accepted[i] += 1
        per_prompt[str(row["question_id"])] = total
        per_prompt_steps[str(row["question_id"])] = len(row["spec"]["per_step_accepted"])
    new_tokens = sum(len(r["tokens"]) for r in result["rows"])
    return {"prompts": len(result["rows"]), "new_tokens": new_tokens, "draft_steps": steps,
            "accepted_per_position": accepted, "reached_per_position": reached,
            "alpha": [a / n if n else None for a, n in zip(accepted, reached)],
            "accepted_per_step": sum(accepted) / steps if steps else None,
            # Every prompt's first target forward (the prefill) verifies nothing in vLLM.
            "tau_draftkit_definition": new_tokens / (steps + len(result["rows"])) if steps else None,
            "per_prompt_accepted": per_prompt, "per_prompt_steps": per_prompt_steps,
            "counters": result["spec_decode_counters"]}


def agreement(dk: dict, vl: dict) -> dict:
    """Per position: the difference of the two α in units of its binomial standard error (|z| < 2: within noise)."""
    positions = []
    for i, (a1, n1, a2, n2) in enumerate(zip(dk["accepted_per_position"], dk["reached_per_position"],
                                             vl["accepted_per_position"], vl["reached_per_position"])):
        if not n1 or not n2:
            positions.append({"position": i + 1, "z": None})
            continue
        p1, p2 = a1 / n1, a2 / n2
        pooled = (a1 + a2) / (n1 + n2)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
        positions.append({"position": i + 1, "draftkit": p1, "vllm": p2, "difference": p2 - p1,
                          "standard_error": se, "z": (p2 - p1) / se if se else 0.0})
    zs = [abs(p["z"]) for p in positions if p["z"] is not None]
    same_prompts = sum(dk["per_prompt_accepted"].get(q) == v for q, v in vl["per_prompt_accepted"].items())
    return {"positions": positions, "max_abs_z": max(zs) if zs else None,
            "within_noise": all(z < 2.0 for z in zs), "prompts_with_equal_accepted_total": same_prompts}


def tokens_equal(a: list[int], b: list[int], eos: set[int]) -> bool:
    strip = lambda t: t[:-1] if t and t[-1] in eos else t  # noqa: E731
    return strip(list(a)) == strip(list(b))


def readable_by_others(folder: Path) -> dict:
    """Mode bits a serving container running as another user needs: o+r on files, o+rx on folders."""
    bad = []
    for path in [folder, *sorted(folder.rglob("*"))]:
        mode = path.stat().st_mode
        need = (stat.S_IROTH | stat.S_IXOTH) if path.is_dir() else stat.S_IROTH
        if mode & need != need:
            bad.append(f"{path.relative_to(folder.parent)} {stat.filemode(mode)}")
    return {"readable_by_others": not bad, "not_readable": bad[:10]}


def config_checks(family: str, artifact: Path, target_config: dict) -> dict:
    """The config keys the loaders read that the check on 2026-12 found wrong, checked on the served folder."""
    config = json.loads((artifact / "config.json").read_text())
    checks = {}
    if family == "draft_model":
        checks["max_position_embeddings"] = {"export": config.get("max_position_embeddings"),
                                             "target": target_config.get("max_position_embeddings")}
        checks["context_of_target"] = config.get("max_position_embeddings") == target_config.get("max_position_embeddings")
    if family == "eagle1":
        from safetensors import safe_open

        with safe_open(str(artifact / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        # vLLM's and SGLang's Llama layers build attention biases when config "bias" or "attention_bias" is true.
        checks["attention_bias_off"] = not config.get("bias", False) and not config.get("attention_bias", False)
        # Without a stored embedding both runtimes use the target's own (vLLM: has_own_embed_tokens is false).
        checks["shares_target_embedding"] = "embed_tokens.weight" not in keys
        checks["context_of_target"] = config.get("max_position_embeddings") == target_config.get("max_position_embeddings")
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help="folder for the run directories, evaluations and vLLM outputs")
    parser.add_argument("--vllm-python", help="python of a virtual environment with vLLM (launch/vllm.md)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the results")
    parser.add_argument("--families", default="draft_model,medusa,eagle1,eagle3",
                        help=f"subset of {','.join(FAMILIES)}; a family whose recipe is not installed is skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny random target and budgets: checks the pipeline")
    parser.add_argument("--train-only", action="store_true", help="train the families and stop (no vLLM needed)")
    parser.add_argument("--reexport", action="store_true",
                        help="write finished runs' exports again with this draftkit (no training) before serving them")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.work is None or (args.vllm_python is None and not args.train_only):
        parser.error("--work and --vllm-python are required")
    data_root = os.environ.get("DRAFTKIT_SHARED_DATA", "../shared/data")
    spec_bench = Path(data_root, "spec_bench", "question.jsonl")
    if not spec_bench.is_file():
        raise SystemExit(f"no Spec-Bench under {data_root}; set DRAFTKIT_SHARED_DATA to the shared data folder")
    from bench_common import machine, selected_families

    families = selected_families(args.families, FAMILIES)
    skipped = {f: f"recipe {FAMILIES[f]['needs_recipe']} is not installed"
               for f in families if FAMILIES[f].get("needs_recipe") and not recipe_exists(FAMILIES[f]["needs_recipe"])}
    families = [f for f in families if f not in skipped]
    budget = SMOKE if args.smoke else CPU
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    started = time.perf_counter()
    answers = work / "selfdistill.jsonl"
    trained = {f: train(f, budget["steps"][f], work / "runs" / f, budget, data_root, answers, log, args.reexport)
               for f in families}
    untrained_runs = {f: train(f, 0, work / "runs" / f"{f}_untrained", budget, data_root, answers, log)
                      for f in families}
    if args.train_only:
        return

    import torch

    from draftkit.runtime.evaluate import encode_prompt, eos_token_ids, load_prompts
    from draftkit.runtime.speculative import autoregressive_generate
    from draftkit.targets.hf import load_target, resolve_target_path

    prompts = load_prompts(spec_bench, limit_per_category=budget["limit_per_category"], categories=budget["categories"])
    if args.smoke:
        target_dir = smoke_target_dir(work)
        target_arg = str(target_dir)
    else:
        target_arg = "builtin:smollm2-135m-instruct"
        target_dir = Path(resolve_target_path(target_arg))
    target = load_target(str(target_dir), dtype="float32", device="cpu")
    eos = eos_token_ids(target)
    encoded = [{"question_id": r["question_id"], "category": r["category"],
                "ids": encode_prompt(target.tokenizer, r["turns"][0], "cpu")[0].tolist()} for r in prompts]
    max_new = budget["max_new_tokens"]
    reference = cached(work / "draftkit_greedy.json", {"prompts": encoded, "max_new_tokens": max_new, "eos": eos},
                       lambda: [autoregressive_generate(target.model, torch.tensor([p["ids"]]), max_new_tokens=max_new,
                                                        eos_token_id=eos).tokens for p in encoded])
    target_config = json.loads((target_dir / "config.json").read_text())
    vllm_settings = {**VLLM_SETTINGS, "max_model_len": budget["max_model_len"]}
    del target

    def serve(name: str, speculative_config: dict | None, fingerprint: str | None) -> dict:
        job = {"target": str(target_dir), "settings": vllm_settings, "prompts": encoded, "max_new_tokens": max_new,
               "stop_token_ids": eos, "speculative_config": speculative_config, "artifact": fingerprint}
        out = work / "vllm" / f"{name}.json"
        stored = work / "vllm" / f"{name}.job.json"
        if out.is_file() and stored.is_file() and json.loads(stored.read_text()) == job:
            return json.loads(out.read_text())
        out.parent.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps(job))
        out.unlink(missing_ok=True)
        job_file = work / "vllm" / f"{name}.run.json"
        job_file.write_text(json.dumps({**job, "out": str(out)}))
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        run_logged([args.vllm_python, str(Path(__file__).resolve()), "--worker", str(job_file)], log, env=env)
        return json.loads(out.read_text())

    plain = serve("plain", None, None)
    plain_vs_draftkit = [tokens_equal(r["tokens"], ref, set(eos)) for r, ref in zip(plain["rows"], reference)]
    results = {}
    for family in families:
        spec = FAMILIES[family]
        run_dir = work / "runs" / family
        result = json.loads((run_dir / "result.json").read_text())
        artifact = Path(spec["artifact"](result))
        fingerprint = artifact_fingerprint(artifact)
        evaluation = draftkit_eval(family, artifact, fingerprint, target_arg, spec_bench, budget, work, log)
        served = serve(family, {"method": spec["method"], "model": str(artifact),
                                "num_speculative_tokens": spec["gamma"]}, fingerprint)
        dk, vl = eval_summary(evaluation), vllm_summary(served, spec["gamma"])
        identical = [tokens_equal(s["tokens"], p["tokens"], set(eos)) for s, p in zip(served["rows"], plain["rows"])]
        untrained_artifact = Path(spec["artifact"](json.loads(
            (work / "runs" / f"{family}_untrained" / "result.json").read_text())))
        before = eval_summary(draftkit_eval(family, untrained_artifact, artifact_fingerprint(untrained_artifact),
                                            target_arg, spec_bench, budget, work, log, name=f"{family}_untrained"))
        results[family] = {
            "recipe_command": trained[family]["command"], "train_wall_s": trained[family]["wall_s"],
            "training": training_summary(run_dir),
            "artifact": str(artifact), "vllm_speculative_config": {"method": spec["method"], "model": "<artifact>",
                                                                   "num_speculative_tokens": spec["gamma"]},
            "draftkit_eval_command": evaluation["serve_vllm_command"],
            "greedy_identical_to_plain_vllm": {"prompts": len(identical), "identical": sum(identical)},
            "untrained_command": untrained_runs[family]["command"],
            "untrained_draftkit": drop_per_prompt(before), "draftkit": drop_per_prompt(dk), "vllm": drop_per_prompt(vl),
            "agreement": agreement(dk, vl),
            "per_prompt_accepted": {"draftkit": dk["per_prompt_accepted"], "vllm": vl["per_prompt_accepted"]},
            "vllm_startup_s": served["startup_s"], "vllm_decode_s": served["decode_s"],
            "vllm_tokens_per_s": vl["new_tokens"] / served["decode_s"] if served["decode_s"] else None,
            "checks": {**config_checks(family, artifact, target_config), **readable_by_others(artifact)},
        }
        print(f"[serve_vllm] {family}: identical {sum(identical)}/{len(identical)}, alpha draftkit "
              f"{fmt_list(dk['alpha'])} vs vLLM {fmt_list(vl['alpha'])}", flush=True)

    import platform

    date = time.strftime("%Y-%m-%d")
    stem = f"serve_vllm_{'tiny' if args.smoke else 'smollm2_135m'}_cpu_{date}"
    payload = {
        "benchmark": "every exportable draft family served by vLLM (offline LLM API) next to plain vLLM and "
                     "draftkit's runtime: greedy outputs and acceptance by draft position on held-out Spec-Bench",
        "command": "DRAFTKIT_SHARED_DATA=<shared>/data python benchmarks/serve_vllm.py --work <dir> "
                   f"--vllm-python <vllm venv>/bin/python --families {','.join(families)}"
                   + (" --smoke" if args.smoke else ""),
        "date": date, "machine": {**machine(), "cpu_count": os.cpu_count(), "processor": platform.processor()},
        "vllm": {"version": plain["vllm_version"], "settings": vllm_settings,
                 "environment": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, "plain_startup_s": plain["startup_s"],
                 "plain_tokens_per_s": sum(len(r["tokens"]) for r in plain["rows"]) / plain["decode_s"]},
        "target": target_arg, "prompts": {"file": "spec_bench/question.jsonl", "limit_per_category": budget[
            "limit_per_category"], "count": len(encoded), "max_new_tokens": max_new, "temperature": 0.0},
        "plain_vllm_equals_draftkit_greedy": {"prompts": len(plain_vs_draftkit), "identical": sum(plain_vs_draftkit)},
        "skipped": skipped, "families": results, "wall_s": time.perf_counter() - started,
        "notes": [EOS_NOTE,
                  "alpha_i = draft tokens accepted at position i / steps that reached position i; vLLM's from its "
                  "per-request per-step accepted counts, draftkit's from python -m draftkit.eval on the same export",
                  "z: the difference of the two alphas over its pooled binomial standard error"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(payload))
    print(markdown(payload))
    print(f"wrote {args.out / stem}.json and .md")


def cached(path: Path, key: dict, compute):
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            return stored["value"]
    value = compute()
    path.write_text(json.dumps({"key": key, "value": value}))
    return value


def smoke_target_dir(work: Path) -> Path:
    """The tiny random target on disk for vLLM, shaped so vLLM's CPU attention takes it (head size 64); the recipes
    build the same weights from the same seed (SMOKE's target overrides)."""
    from draftkit.targets.tiny import tiny_target

    folder = work / "tiny_target"
    if not (folder / "config.json").is_file():
        target = tiny_target(**SMOKE_TARGET)
        target.model.save_pretrained(folder)
        target.tokenizer.save_pretrained(folder)
    return folder


def artifact_fingerprint(folder: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(f"{path.relative_to(folder)}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def draftkit_eval(family: str, artifact: Path, fingerprint: str, target_arg: str, spec_bench: Path, budget: dict,
                  work: Path, log: Path, name: str | None = None) -> dict:
    out = work / "eval" / (name or family)
    command = [sys.executable, "-m", "draftkit.eval", "--draft", str(artifact), "--target", target_arg, "--prompts",
               str(spec_bench), "--limit-per-category", str(budget["limit_per_category"]), "--max-new-tokens",
               str(budget["max_new_tokens"]), "--no-speedup", "--no-progress", "--out", str(out),
               *(["--categories", ",".join(budget["categories"])] if budget["categories"] else []),
               *FAMILIES[family]["eval"]]
    key = {"command": command, "artifact": fingerprint}
    stored = out / "serve_vllm_key.json"
    if not (out / "eval.json").is_file() or not stored.is_file() or json.loads(stored.read_text()) != key:
        run_logged(command, log)
        stored.write_text(json.dumps(key))
    report = json.loads((out / "eval.json").read_text())
    report["serve_vllm_command"] = shlex.join(["python", "-m", "draftkit.eval", *command[3:]])
    return report


def training_summary(run_dir: Path) -> dict:
    """Steps and the loss at the start and the end of each training stage of a run (its history.json files)."""
    stages = {}
    for history_file in sorted(run_dir.glob("*/history.json")):
        history = json.loads(history_file.read_text())
        if history:
            stages[history_file.parent.name] = {"steps": history[-1]["step"], "first_loss": history[0]["loss"],
                                                "last_loss": history[-1]["loss"]}
    return stages


def drop_per_prompt(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("per_prompt")}


def fmt_list(values) -> str:
    return "[" + ", ".join("–" if v is None else f"{v:.3f}" for v in values) + "]"


def markdown(payload: dict) -> str:
    lines = [f"# vLLM serves draftkit's exports ({payload['date']})", "",
             f"vLLM {payload['vllm']['version']} (CPU build), target `{payload['target']}`, "
             f"{payload['prompts']['count']} held-out Spec-Bench prompts × {payload['prompts']['max_new_tokens']} new "
             "tokens, greedy, fp32. Command: `" + payload["command"] + "`.", "",
             f"Plain vLLM equals draftkit's greedy decoding on {payload['plain_vllm_equals_draftkit_greedy']['identical']}"
             f" of {payload['plain_vllm_equals_draftkit_greedy']['prompts']} prompts.", "",
             "| family | identical to plain vLLM | untrained τ (draftkit) | τ draftkit | accepted/step draftkit | "
             "accepted/step vLLM | α draftkit | α vLLM | max abs z | checks |",
             "|---|---|---:|---:|---:|---:|---|---|---:|---|"]
    for name, r in payload["families"].items():
        same = r["greedy_identical_to_plain_vllm"]
        before = r["untrained_draftkit"]
        failed = [k for k, v in r["checks"].items() if v is False]
        lines.append(" | ".join([
            f"| {name}", f"{same['identical']}/{same['prompts']}", f"{before['tau_draftkit']:.3f}",
            f"{r['draftkit']['tau_draftkit']:.3f}", f"{r['draftkit']['accepted_per_step']:.3f}",
            f"{r['vllm']['accepted_per_step']:.3f}", fmt_list(r["draftkit"]["alpha"]), fmt_list(r["vllm"]["alpha"]),
            "–" if r["agreement"]["max_abs_z"] is None else f"{r['agreement']['max_abs_z']:.2f}",
            "all pass" if not failed else "failed: " + ", ".join(failed)]) + " |")
    if payload["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in payload["skipped"].items()) + "."]
    lines += ["", *[f"- {note}" for note in payload["notes"]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
