"""FastDraft end to end on the tiny target: both stages, resume, stage-by-stage runs, and the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from draftkit.config import compose
from draftkit.recipes import fastdraft


def run_recipe(run_dir, *overrides):
    cfg = compose(["+recipe=fastdraft", "+debug=tiny", f"hydra.run.dir={run_dir}", *overrides])
    cfg.run_dir = str(run_dir)
    return fastdraft.run(cfg, run_dir)


def losses(run_dir, stage):
    return [h["loss"] for h in json.loads((run_dir / stage / "history.json").read_text())]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fastdraft")
    export = run_recipe(run_dir)
    return run_dir, export


def test_both_stages_train_with_pinned_losses(finished_run):
    run_dir, _ = finished_run
    assert losses(run_dir, "pretrain") == pytest.approx([5.7598, 5.7408, 5.6286], abs=1e-4)  # 8 + 8 records (pretrain_limit)
    finetune = losses(run_dir, "finetune")
    assert len(finetune) == 3 and finetune[-1] < finetune[0]


def test_run_directory_records_how_it_was_made(finished_run):
    run_dir, _ = finished_run
    info = json.loads((run_dir / "run_info.json").read_text())
    assert set(info["git"]) == {"commit", "dirty"}
    assert info["packages"]["torch"] == torch.__version__.split("+")[0] or info["packages"]["torch"] == torch.__version__
    config = (run_dir / "config.yaml").read_text()
    assert "max_steps_per_stage: 3" in config and "${" not in config
    summary = (run_dir / "summary.md").read_text()
    assert "| before training |" in summary and "| after training |" in summary
    assert len(json.loads((run_dir / "selfdistill.jsonl").read_text().splitlines()[0])) > 0


def test_export_loads_and_matches_the_trained_draft_config(finished_run):
    run_dir, export = finished_run
    draft = AutoModelForCausalLM.from_pretrained(export)
    assert draft.config.vocab_size == 320 and draft.config.num_hidden_layers == 1
    result = json.loads((run_dir / "result.json").read_text())
    assert result["after"]["overall"]["outputs_differing_from_ar"] == 0
    assert "τ" in (export / "README.md").read_text()


def test_rerun_in_the_same_directory_resumes_without_retraining(finished_run):
    run_dir, export = finished_run
    before = {p: (run_dir / p / "history.json").read_text() for p in ("pretrain", "finetune")}
    weights = (export / "model.safetensors").read_bytes()
    run_recipe(run_dir)
    assert {p: (run_dir / p / "history.json").read_text() for p in before} == before
    assert (export / "model.safetensors").read_bytes() == weights


def test_stages_run_separately(tmp_path, finished_run):
    _, export = finished_run
    run_recipe(tmp_path, "fastdraft.stages=[finetune]", "draft=pretrained", f"draft.path={export}", "eval=none")
    assert not (tmp_path / "pretrain").exists()
    assert len(losses(tmp_path, "finetune")) == 3


def test_unknown_stage_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"fastdraft.stages=\['pretrian'\] names no known stage. Fix: choose from "
                                         r"\['pretrain', 'finetune'\]"):
        run_recipe(tmp_path, "fastdraft.stages=[pretrian]")


def test_command_line_with_the_debug_overlay_first(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "draftkit.train", "+debug=tiny", "+recipe=fastdraft", "eval=none",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert "Draft exported to" in proc.stdout


def test_more_steps_on_a_finished_run_continue_training_and_remeasure(tmp_path, finished_run):
    import shutil

    run_dir, _ = finished_run
    shutil.copytree(run_dir, tmp_path / "run")
    report = tmp_path / "run" / "eval_after.json"
    report.write_text(report.read_text().replace('"prompts"', '"stale_marker": 1, "prompts"', 1))
    run_recipe(tmp_path / "run", "engine.max_steps_per_stage=5")
    assert len(losses(tmp_path / "run", "finetune")) == 5
    assert losses(tmp_path / "run", "finetune")[:3] == losses(run_dir, "finetune")
    assert "stale_marker" not in report.read_text()


def test_a_typed_engine_value_beats_the_stages_own_and_the_run_records_what_it_used(tmp_path):
    run_recipe(tmp_path, "fastdraft.stages=[pretrain]", "eval=none", "engine.lr=0.0123", "engine.warmup_steps=0")
    used = json.loads((tmp_path / "pretrain" / "settings.json").read_text())
    assert (used["lr"], used["warmup_steps"], used["steps"]) == (0.0123, 0, 3)  # steps: the +debug=tiny cap
    assert "pretrain:\n    seq_len: 256\n    engine:\n      steps: 120\n      lr: 0.0123\n      warmup_steps: 0" in \
        (tmp_path / "config.yaml").read_text()
