"""benchmarks/budget_table.py: a family trained and measured end to end on the tiny target, and the table's record of a
run continued over several calls."""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from draftkit.config import compose

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import budget_table  # noqa: E402  (a script in benchmarks/, imported for its table code)


def questions(path: Path) -> Path:
    rows = [{"question_id": i, "category": category, "turns": [f"Say something about {category} number {i}."]}
            for i, category in enumerate(["qa", "rag", "qa", "rag"])]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_family_is_trained_then_measured_on_the_held_out_prompts_and_tabled(tmp_path, target_dir):
    directory, _ = target_dir
    work, out = tmp_path / "work", tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "budget_table.py"), "train", "--work", str(work), "--families", "eagle1",
         "--budget", "smoke", "--target-path", str(directory), "--parallel", "1", "--devices", "0",
         "--deadline-s", "240",
         "--eval-prompts", str(questions(tmp_path / "question.jsonl")), "--limit-per-category", "1",
         "--max-new-tokens", "8", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (table,) = out.glob("budget_smoke_*.json")
    row = json.loads(table.read_text())["families"]["eagle1"]
    # budget=smoke caps the stage at 5 steps; one prompt of each of the two categories; EAGLE-1 decodes a dynamic tree
    assert row["train_steps"] == 5 and row["prompts"] == 2 and set(row["categories"]) == {"qa", "rag"}
    assert row["tree"]["kind"] == "dynamic" and "train_commands_by_call" not in row
    assert row["train_command"] == (work / "eagle1" / "budget_command.txt").read_text().strip()
    assert "target.dtype=float32" in row["train_command"] and "budget=smoke" in row["train_command"]
    # the call is timed and placed: one call, on the device given, finished, alone on its device (the evaluation starts
    # once training has ended)
    (call,) = row["train_calls"]
    assert call["device"] == "0" and call["finished"] and call["returncode"] == 0
    assert call["command"] == row["train_command"]
    assert call["most_processes_on_its_device"] == 1 and not row["device_shared"]
    assert 0 < call["seconds"] < 240 and row["train_minutes"] == round(call["seconds"] / 60, 1)


def test_a_run_continued_over_several_calls_keeps_every_calls_command(tmp_path):
    work = tmp_path / "work"
    (work / "fspad").mkdir(parents=True)
    (work / "fspad" / "budget_command.txt").write_text("train engine.steps=3000\ntrain engine.steps=5000\n")
    (work / "fspad" / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (2500, 5000)))
    calls = [{"command": "train engine.steps=3000", "device": None, "seconds": 570.0, "returncode": -2,
              "finished": False, "most_processes_on_its_device": 1},
             {"command": "train engine.steps=5000", "device": None, "seconds": 300.0, "returncode": 0,
              "finished": True, "most_processes_on_its_device": 2}]
    (work / "fspad" / "budget_calls.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls))
    (work / "eval" / "fspad").mkdir(parents=True)
    (work / "eval" / "fspad" / "eval.json").write_text(json.dumps({
        "config": {"tree": {"kind": "dynamic", "depth": 6, "top_k": 10, "total_tokens": 59}},
        "overall": {"tau": 2.3, "tau_ci": [2.1, 2.5], "alpha": [0.65, 0.61], "prompts": 40, "new_tokens": 3675},
        "categories": {"qa": {"tau": 3.0}}}))
    args = Namespace(families=["fspad"], work=work, budget="gpu30", out=tmp_path / "out")
    budget_table.write_table(args)
    (table,) = args.out.glob("budget_gpu30_*.json")
    row = json.loads(table.read_text())["families"]["fspad"]
    assert row["train_command"] == "train engine.steps=5000" and row["train_steps"] == 5000
    assert row["train_commands_by_call"] == ["train engine.steps=3000", "train engine.steps=5000"]
    # 570 s + 300 s; the second call shared its device with an evaluation, so its wall time is marked
    assert row["train_minutes"] == 14.5 and row["device_shared"] and row["train_calls"] == calls
    (markdown,) = args.out.glob("budget_gpu30_*.md")
    line = ("| fspad | 5000 | 14.5 (shared) | 2.30 | 2.10–2.50 | 0.65 | 0.61 | – | 40 | "
            "dynamic tree, 59 tokens, depth 6 |")
    assert line in markdown.read_text()


def test_a_process_goes_to_the_device_the_fewest_use_and_sees_only_that_device(tmp_path):
    devices = ["0", "1", "2"]
    assert budget_table.least_used(devices, []) == "0"
    assert budget_table.least_used(devices, ["0", "2"]) == "1"
    assert budget_table.least_used(devices, ["0", "1", "2", "1", "0"]) == "2"
    assert budget_table.least_used(devices, ["0", "1", "2"]) == "0"  # a tie goes to the one given first
    log_path = tmp_path / "child.log"
    with open(log_path, "w") as log:
        child = budget_table.start([sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"],
                                   log, "2")
    assert child.wait(timeout=60) == 0 and log_path.read_text().strip() == "2"


def test_devices_that_are_not_distinct_numbers_are_refused(tmp_path):
    for devices in ("0,0", "cuda:1"):
        done = subprocess.run([sys.executable, str(BENCHMARKS / "budget_table.py"), "train", "--work",
                               str(tmp_path / "w"), "--families", "eagle1", "--devices", devices],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "give distinct CUDA device numbers, e.g. --devices 0,1,2,3" in done.stderr
    assert not (tmp_path / "w").exists()


def test_specdecpp_trains_its_head_for_the_fastdraft_draft_trained_first(tmp_path):
    from draftkit.targets.tiny import tiny_target

    target = tiny_target(num_layers=3)  # FastDraft's draft=from_target keeps two of its layers
    target.model.save_pretrained(tmp_path / "target")
    target.tokenizer.save_pretrained(tmp_path / "target")
    work, out = tmp_path / "work", tmp_path / "out"
    common = [sys.executable, str(BENCHMARKS / "budget_table.py"), "train", "--work", str(work), "--budget", "smoke",
              "--target-path", str(tmp_path / "target"), "--parallel", "2"]
    refused = subprocess.run([*common, "--families", "specdecpp"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.strip().endswith(
        "specdecpp trains for fastdraft's draft, which --work holds no finished run of: add fastdraft to --families")
    done = subprocess.run(
        [*common, "--families", "specdecpp,fastdraft", "--eval-prompts", str(questions(tmp_path / "question.jsonl")),
         "--limit-per-category", "1", "--max-new-tokens", "8", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(next(out.glob("budget_smoke_*.json")).read_text())["families"]
    assert set(rows) == {"fastdraft", "specdecpp"}
    fastdraft_export = json.loads((work / "fastdraft" / "result.json").read_text())["export"]
    assert f"draft.path={fastdraft_export}" in rows["specdecpp"]["train_command"]


def test_a_table_of_nothing_measured_is_refused_and_nothing_is_written(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "budget_table.py"), "table", "--work", str(tmp_path / "w"),
                           "--families", "eagle3,eagle3_frozen_head", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no family of ['eagle3', 'eagle3_frozen_head'] is measured" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", sorted(budget_table.FAMILIES))
def test_every_family_composes_at_gpu30_with_its_own_settings_winning_over_the_budget(family):
    overrides, _ = budget_table.FAMILIES[family]
    cfg = compose([*overrides, "budget=gpu30", "data=sharegpt"])
    for override in overrides[1:]:
        key, value = override.split("=", 1)
        if key == "draft":  # a config group chosen, not a value
            continue
        assert OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}))["v"] == yaml.safe_load(value)
