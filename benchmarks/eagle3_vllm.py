"""Does vLLM serve draftkit's EAGLE-3 exports by itself, and losslessly? (CPU check, tiny target.)

Trains an EAGLE-3 draft with the eagle3 recipe (+debug=tiny, 100 steps, a 160-token draft vocabulary) on an 8-layer
random Llama (hidden 128, head_dim 64: vLLM's CPU attention refuses head_dim 8), which exports it (speculators/ and
sglang/ folders, the verifier named as the saved target), then, in the
interpreter given by --vllm-python (a venv with vLLM; its torch and transformers pins clash with draftkit's), runs
plain greedy vLLM and vLLM with speculative_config {"method": "eagle3", "model": <folder>} on the same prompts and
records whether the outputs are identical and vLLM's per-position acceptance counts next to draftkit's runtime's.

    python benchmarks/eagle3_vllm.py --work /tmp/eagle3_vllm --vllm-python /work/vllm-venv/bin/python \\
        --out benchmarks/results/eagle3_vllm_cpu_$(date +%F).json
    # a recipe's export on its real target instead (vLLM only: plain vs speculative, chat prompts):
    ... --export runs/eagle3/<run>/export --target-dir <the target's HF directory>

vLLM on CPU needs: VLLM_ENABLE_V1_MULTIPROCESSING=0 (set here), enforce_eager, a small gpu_memory_utilization.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS = ["Hello there", "Name three colours.", "What is two plus two?", "Tell me a short story."]
LAYERS = [2, 4, 5]
TARGET = {"num_layers": 8, "hidden_size": 128, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 256}
MAX_TOKENS = 24
GAMMA = 3

VLLM_SCRIPT = """
import json, os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
import vllm
from vllm import LLM, SamplingParams
target, out, prompts, max_tokens, gamma = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
drafts = sys.argv[6:]
params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
common = dict(enforce_eager=True, disable_log_stats=False, gpu_memory_utilization=0.1, max_model_len=256, seed=0,
              dtype="float32")
def run(model=target, **extra):
    llm = LLM(model=model, **common, **extra)
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    metrics = {m.name: (list(m.values) if hasattr(m, "values") else getattr(m, "value", None))
               for m in llm.get_metrics() if "spec_decode" in m.name}
    spec = llm.llm_engine.vllm_config.speculative_config
    served = {"model": llm.llm_engine.vllm_config.model_config.model,
              "speculative_config": None if spec is None else {"method": spec.method, "model": spec.model,
                                                               "num_speculative_tokens": spec.num_speculative_tokens}}
    metrics["served"] = served
    return [list(r.outputs[0].token_ids) for r in res], metrics
plain, _ = run()
result = {"vllm": vllm.__version__, "plain": plain, "drafts": {}}
for draft in drafts:
    try:
        spec, metrics = run(speculative_config={"method": "eagle3", "model": draft, "num_speculative_tokens": gamma})
        result["drafts"][draft] = {"outputs": spec, "identical_to_plain": spec == plain, "metrics": metrics}
    except Exception as error:
        result["drafts"][draft] = {"error": repr(error)}
# The speculators folder alone (`vllm serve <folder>`): vLLM reads the verifier, the method and the draft length from it.
try:
    spec, metrics = run(model=drafts[0])
    result["one_argument"] = {"folder": drafts[0], "outputs": spec, "identical_to_plain": spec == plain,
                              "metrics": metrics}
except Exception as error:
    result["one_argument"] = {"folder": drafts[0], "error": repr(error)}
json.dump(result, open(out, "w"), indent=1)
"""


def prepare(work: Path) -> dict:
    """The target, a draft trained by the eagle3 recipe on it, its exports, and draftkit's own decoding of the prompts."""
    import torch

    from draftkit.export.eagle3 import load_eagle3_drafter
    from draftkit.runtime.eagle3 import Eagle3ChainDrafter
    from draftkit.runtime.speculative import speculative_generate
    from draftkit.targets.tiny import tiny_target
    from draftkit.train import run_recipe

    # The recipe builds the same target from the same seed; vLLM reads this copy of it.
    target = tiny_target(**TARGET)
    target.model.save_pretrained(work / "target")
    target.tokenizer.save_pretrained(work / "target")
    # The draft learns the target's own answers to the check's questions (self-distillation), so it is accepted there.
    (work / "prompts.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                                                for q in QUESTIONS))
    prompts = [list(target.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                         tokenize=True, return_dict=True)["input_ids"])
               for q in QUESTIONS]
    # conf/target/tiny.yaml sets num_layers and hidden_size; the other sizes are tiny_target's arguments.
    sizes = [f"{'' if key in ('num_layers', 'hidden_size') else '+'}target.{key}={value}" for key, value in TARGET.items()]
    run_recipe(["+recipe=eagle3", "+debug=tiny", *sizes,
                f"eagle3.aux_layers=[{','.join(map(str, LAYERS))}]", "eagle3.draft_vocab_size=160",
                f"data.prompts=[{work / 'prompts.jsonl'}]", f"data.selfdistill.num_prompts={len(QUESTIONS)}",
                f"data.selfdistill.max_new_tokens={MAX_TOKENS + 8}", "eagle3.ttt.steps=3",
                "engine.max_steps_per_stage=100", "engine.lr=3e-3", "eval=none",
                f"eagle3.export.num_speculative_tokens={GAMMA}", f"eagle3.export.verifier={work / 'target'}"],
               work / "run")
    exports = {fmt: work / "run" / "export" / fmt for fmt in ("speculators", "sglang")}
    ours = {}
    for fmt in ("speculators", "sglang"):
        module, _ = load_eagle3_drafter(exports[fmt], embed_weight=target.embed_tokens.weight,
                                        lm_head_weight=target.lm_head.weight)
        accepted, outputs, lossless = [0] * GAMMA, [], True
        for prompt in prompts:
            run = speculative_generate(target.model, Eagle3ChainDrafter(module, LAYERS), torch.tensor([prompt]),
                                       gamma=GAMMA, max_new_tokens=MAX_TOKENS)
            reference = target.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_TOKENS,
                                              pad_token_id=0)[0, len(prompt):].tolist()
            lossless &= run.tokens == reference
            outputs.append(run.tokens)
            accepted = [a + b for a, b in zip(accepted, run.stats.accepted_per_position)]
        ours[str(exports[fmt])] = {"outputs": outputs, "lossless_vs_hf_greedy": lossless,
                                   "accepted_per_position": accepted}
    return {"exports": {k: str(v) for k, v in exports.items()}, "draftkit": ours, "prompts": prompts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--vllm-python", required=True, help="an interpreter with vLLM installed")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--export", type=Path, help="a recipe's export folder, served on --target-dir (no tiny draft)")
    parser.add_argument("--target-dir", type=Path, help="the HF directory of the target --export was trained for")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if args.export:
        return serve_export(args, start, argv)
    prepared = prepare(args.work)
    drafts = [prepared["exports"]["speculators"], prepared["exports"]["sglang"]]
    served = args.work / "vllm.json"
    subprocess.run([args.vllm_python, "-c", VLLM_SCRIPT, str(args.work / "target"), str(served),
                    json.dumps(prepared["prompts"]), str(MAX_TOKENS), str(GAMMA), *drafts], check=True)
    vllm = json.loads(served.read_text())
    rows = {}
    for draft in drafts:
        theirs, ours = vllm["drafts"][draft], prepared["draftkit"][draft]
        rows[Path(draft).name] = {
            "vllm_identical_to_plain_vllm": theirs.get("identical_to_plain"),
            "vllm_error": theirs.get("error"),
            "draftkit_identical_to_vllm": ours["outputs"] == vllm["plain"],
            "draftkit_lossless": ours["lossless_vs_hf_greedy"],
            "vllm_accepted_per_position": theirs.get("metrics", {}).get("vllm:spec_decode_num_accepted_tokens_per_pos"),
            "vllm_drafts": theirs.get("metrics", {}).get("vllm:spec_decode_num_drafts"),
            "draftkit_accepted_per_position": ours["accepted_per_position"],
            "vllm_served": theirs.get("metrics", {}).get("served"),
        }
    alone = vllm.get("one_argument", {})
    rows["speculators_folder_alone"] = {
        "what": "LLM(model=<export>/speculators) with no speculative_config, as `vllm serve <folder>`",
        "vllm_identical_to_plain_vllm": alone.get("identical_to_plain"), "vllm_error": alone.get("error"),
        "vllm_served": alone.get("metrics", {}).get("served"),
        "vllm_accepted_per_position": alone.get("metrics", {}).get("vllm:spec_decode_num_accepted_tokens_per_pos"),
    }
    import platform

    import torch

    report = {
        "what": "vLLM serving draftkit's EAGLE-3 exports (speculators/ and sglang/ folders, and the speculators folder "
                "as the only argument) by itself, greedy, fp32",
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/eagle3_vllm.py", *(argv or sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(), "torch": torch.__version__},
        "vllm_version": vllm["vllm"], "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.time() - start, 1),
        "target": "tiny random Llama (draftkit.targets.tiny, seed 0), 8 layers, hidden 128, 2 heads (head_dim 64), "
                  "vocab 320; aux layers [2, 4, 5]",
        "draft": "the eagle3 recipe with +debug=tiny on the target's own answers to the questions: 100 steps (3 TTT "
                 "steps, lr 3e-3), 160-token draft vocabulary (d2t/t2d)",
        "questions": QUESTIONS, "prompts": prepared["prompts"], "max_tokens": MAX_TOKENS,
        "num_speculative_tokens": GAMMA,
        "results": rows,
        "notes": "draftkit drafts fewer tokens near max_tokens (it never drafts past the limit) while vLLM always drafts "
                 "num_speculative_tokens, so vLLM's later-position counts can exceed draftkit's by those final steps.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return 0


def serve_export(args, start: float, argv) -> int:
    """vLLM plain vs vLLM with the export's speculators and sglang folders on its real target, on chat prompts."""
    import platform

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target_dir)
    questions = ["Name three colours.", "What is the capital of France?", "Write a haiku about the sea.",
                 "Explain what a prime number is in one sentence."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in questions]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    drafts = [str(args.export / fmt) for fmt in ("speculators", "sglang") if (args.export / fmt).is_dir()]
    served = args.work / "vllm.json"
    subprocess.run([args.vllm_python, "-c", VLLM_SCRIPT, str(args.target_dir), str(served), json.dumps(prompts),
                    "48", str(GAMMA), *drafts], check=True)
    vllm = json.loads(served.read_text())
    report = {
        "what": "vLLM serving a recipe's EAGLE-3 export on its real target, greedy, fp32",
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/eagle3_vllm.py", *(argv or sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "vllm_version": vllm["vllm"], "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.time() - start, 1),
        "target": str(args.target_dir), "export": str(args.export), "questions": questions, "max_tokens": 48,
        "results": {Path(d).name: {"vllm_identical_to_plain_vllm": r.get("identical_to_plain"),
                                   "vllm_error": r.get("error"),
                                   "vllm_accepted_per_position":
                                       r.get("metrics", {}).get("vllm:spec_decode_num_accepted_tokens_per_pos"),
                                   "vllm_drafts": r.get("metrics", {}).get("vllm:spec_decode_num_drafts"),
                                   "vllm_served": r.get("metrics", {}).get("served")}
                    for d, r in vllm["drafts"].items()},
        "speculators_folder_alone": vllm.get("one_argument"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
