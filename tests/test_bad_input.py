"""Bad input, the way a new user types it: every probe below ends as one line, `draftkit.<cmd>: <what>. Fix: <how>`,
with exit status 2 and no traceback, before any model is loaded where the input allows (tiny target, in-process).

Each row is (name, command, arguments, what the line must say, what happened before issue 19). Placeholders in braces
are files made by `inputs` below. Train probes run with `+debug=tiny` in a fresh run directory.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftkit import eval as eval_cli
from draftkit import preflight
from draftkit import train as train_cli
from draftkit.export import __main__ as export_cli

COMMANDS = {"train": train_cli.main, "eval": eval_cli.main, "export": export_cli.main, "preflight": preflight.main}

PROBES = [
    # --- draftkit.train: the command line and the config
    ("no recipe", "train", ["engine.lr=1"], r"no recipe chosen\. Fix: add \+recipe=<name>",
     "one line, exit 2 (no fix named)"),
    ("unknown recipe", "train", ["+recipe=fastdraf"], r"unknown recipe 'fastdraf'; available recipes: .*Fix:",
     "one line, exit 2 (no fix named)"),
    ("unknown setting", "train", ["+recipe=fastdraft", "engine.stepz=5"],
     r"engine\.stepz is not a setting of this config\. Fix: check its spelling",
     "Hydra's 6-line error, exit 1"),
    ("unknown group option", "train", ["+recipe=fastdraft", "target=nope"],
     r"target=nope is not an option of target\. Fix: choose one of hf, random, smollm2_135m, tiny",
     "Hydra's 11-line error, exit 1"),
    ("unknown budget", "train", ["+recipe=fastdraft", "budget=huge"], r"unknown budget 'huge'.*Fix: budget=",
     "one line, exit 2 (no fix named)"),
    ("steps not a number", "train", ["+recipe=fastdraft", "engine.steps=abc"],
     r"engine\.steps='abc': must be a whole number \(its default is 100\)\. Fix: e\.g\. engine\.steps=100",
     "traceback (TypeError: '>' not supported between 'str' and 'int'), exit 1"),
    ("zero steps", "train", ["+recipe=fastdraft", "engine.steps=0"],
     r"engine\.steps=0: must be a whole number >= 1\. Fix:", "ignored: each stage's own steps ran, rc 0"),
    ("zero steps in a stage", "train", ["+recipe=fspad", "fspad.train.engine.steps=0"],
     r"fspad\.train\.engine\.steps=0: must be a whole number >= 1",
     "trained 0 steps, exported the untrained drafter, rc 0"),
    ("zero micro-batch", "train", ["+recipe=fastdraft", "engine.micro_batch_size=0"],
     r"engine\.micro_batch_size=0: must be a whole number >= 1",
     "traceback (ZeroDivisionError) after loading the target"),
    ("zero save_every", "train", ["+recipe=fastdraft", "engine.save_every=0"],
     r"engine\.save_every=0: must be a whole number >= 1",
     "traceback (ZeroDivisionError: integer modulo by zero) after loading the target"),
    ("zero log_every", "train", ["+recipe=fastdraft", "engine.log_every=0"],
     r"engine\.log_every=0: must be a whole number >= 1",
     "traceback (ZeroDivisionError: integer modulo by zero) after loading the target"),
    ("negative lr", "train", ["+recipe=fastdraft", "engine.lr=-1"], r"engine\.lr=-1: must be a number >= 0",
     "ignored: each stage's own lr ran, rc 0"),
    ("lr a word", "train", ["+recipe=fastdraft", "engine.lr=fast"], r"engine\.lr='fast': must be a number",
     "ignored: each stage's own lr ran, rc 0"),
    ("fp16", "train", ["+recipe=fastdraft", "engine.precision=fp16"],
     r"engine\.precision='fp16': must be fp32 or bf16", "one line, exit 2 (no fix named)"),
    ("betas a number", "train", ["+recipe=fastdraft", "engine.betas=0.9"], r"engine\.betas=0\.9: must be a list",
     "traceback (TypeError: 'float' object is not iterable) after loading the target"),
    ("a list setting given one file", "train", ["+recipe=fastdraft", "data.pretrain={text_file}"],
     r"data\.pretrain='.*text\.jsonl': must be a list .*Fix: write it in brackets, quoted for the shell: "
     r"'data\.pretrain=\[.*text\.jsonl\]'",
     "each character read as a source: traceback (DataError: /: unsupported file type)"),
    ("missing data file", "train", ["+recipe=fastdraft", "data.prompts=[/nonexistent/prompts.jsonl]"],
     r"data\.prompts: data file not found: /nonexistent/prompts\.jsonl\. Fix: check the path",
     "traceback (DataFileNotFoundError) after loading the target"),
    ("unsupported data file", "train", ["+recipe=fastdraft", "data.prompts=[{txt_file}]"],
     r"data\.prompts: .*prompts\.txt is not a supported data file\. Fix: give a \.jsonl",
     "traceback (DataError) after loading the target"),
    ("unknown builtin source", "train", ["+recipe=fastdraft", "data.prompts=[builtin:nope]"],
     r"unknown builtin source builtin:nope\. Fix: use one of builtin:pretrain",
     "traceback (DataFileNotFoundError) after loading the target"),
    ("hf source without a name", "train", ["+recipe=fastdraft", "data.prompts=[hf:]"],
     r"'hf:' names no dataset\. Fix: write hf:<dataset>", "traceback (DataError) after loading the target"),
    ("prompts without text", "train", ["+recipe=fastdraft", "data.prompts=[{empty_prompts}]"],
     r"data\.prompts: none of the 3 records in .* has a user turn with text.*Fix:",
     "the target answered the empty prompts and the draft trained on them, rc 0"),
    ("plain text as prompts", "train", ["+recipe=fastdraft", "data.prompts=[{text_file}]"],
     r"data\.prompts: .*text\.jsonl holds plain text, but prompts come from chat records\. Fix:",
     "traceback (DataError) after loading the target"),
    ("malformed JSON lines", "train", ["+recipe=fastdraft", "data.prompts=[{bad_json}]"],
     r"bad\.jsonl:2: malformed JSON line .*", "traceback (DataError) after loading the target"),
    ("zero prompts_limit", "train", ["+recipe=fastdraft", "data.prompts_limit=0"],
     r"data\.prompts_limit=0: must be a whole number >= 1", "traceback (DataError) after loading the target"),
    ("missing eval prompts", "train", ["+recipe=fastdraft", "eval.prompts=/nonexistent/eval.jsonl"],
     r"eval\.prompts: data file not found", "traceback (FileNotFoundError) after loading the target"),
    ("zero eval gamma", "train", ["+recipe=fastdraft", "eval.gamma=0"], r"eval\.gamma=0: must be a whole number >= 1",
     "traceback (ValueError) after loading the target"),
    ("resume a word", "train", ["+recipe=fastdraft", "resume=maybe"],
     r"resume='maybe': must be true .*false .*or force .*Fix: resume=true", "resumed ('maybe' is true), rc 0"),
    ("unknown stage", "train", ["+recipe=fastdraft", "fastdraft.stages=[pretrian]"],
     r"fastdraft\.stages=\['pretrian'\] names no known stage\. Fix: choose from \['pretrain', 'finetune'\]",
     "traceback (ValueError), exit 1"),
    ("tree wider than the draft vocabulary", "train",
     ["+recipe=medusa", "medusa.draft_vocab_size=2", "medusa.export.formats=[vllm]", "eval.before=false"],
     r"medusa\.tree: this tree reads the top 4 candidates of a node, but the draft scores only 2 tokens\. Fix: a "
     r"larger medusa\.draft_vocab_size", "trained, then a traceback (ValueError) when measuring: no export"),
    ("fspad tree wider than the draft vocabulary", "train", ["+recipe=fspad", "fspad.draft_vocab_size=3"],
     r"fspad\.tree: this tree reads the top 10 candidates .* only 3 tokens\. Fix: a larger fspad\.draft_vocab_size",
     "traceback (ValueError) after loading and self-distillation"),
    ("label source", "train", ["+recipe=medusa", "medusa.labels=gold"],
     r"medusa\.labels='gold' is not a label source\. Fix: choose 'selfdistill'", "traceback (ValueError), exit 1"),
    ("exit layer outside the target", "train", ["+recipe=kangaroo", "kangaroo.exit_layer=2"],
     r"kangaroo\.exit_layer=2 is outside the target's depth.*Fix: kangaroo\.exit_layer=1 for this 2-layer target",
     "traceback (ValueError) after loading the target"),
    ("divergence", "train", ["+recipe=distillspec", "distillspec.divergence=l2"],
     r"distillspec\.divergence='l2': choose one of fkl, rkl, jsd, tvd\. Fix: give each setting named a value as "
     r"stated", "traceback (ValueError), exit 1"),
    ("stop threshold", "train", ["+recipe=specdecpp", "specdecpp.stop.threshold=2"],
     r"specdecpp\.stop\.threshold=2 must lie in \[0, 1\].*Fix:", "traceback (ValueError), exit 1"),
    ("target path missing", "train", ["+recipe=fastdraft", "target=hf", "target.path=/nonexistent/model"],
     r"target\.path=/nonexistent/model: /nonexistent/model does not exist\. Fix:",
     "Hydra error (OSError: Repo id must be in the form ...), exit 1"),
    ("target path unset", "train", ["+recipe=fastdraft", "target=hf"], r"target\.path is not set\. Fix: target\.path=",
     "traceback (MissingMandatoryValue), exit 1"),
    ("pretrained draft missing", "train", ["+recipe=fastdraft", "draft=pretrained", "draft.path=./no_such_draft"],
     r"draft\.path=\./no_such_draft: no_such_draft does not exist",
     "Hydra error (OSError: Repo id must use alphanumeric chars) after loading the target"),
    ("run directory is a file", "train", ["+recipe=fastdraft", "hydra.run.dir={a_file}"],
     r"the run directory .*a_file is a file\. Fix:", "traceback (FileExistsError), exit 1"),
    # --- draftkit.eval: arguments, checked before the target loads; then the export itself
    ("eval: draft does not exist", "eval", ["--draft", "/nonexistent/export"],
     r"--draft /nonexistent/export: no such directory\. Fix: pass the export/ directory",
     "traceback (OSError: Repo id must be in the form ...) after loading the target"),
    ("eval: a run directory", "eval", ["--draft", "{run_dir}"],
     r"--draft .*run is a run directory\. Fix: pass its export directory: --draft .*run/export",
     "traceback (ValueError: Unrecognized model) after loading the target"),
    ("eval: an unfinished run", "eval", ["--draft", "{unfinished_run}"],
     r"is a run directory without an export: the run has not finished\. Fix:",
     "traceback (ValueError: Unrecognized model) after loading the target"),
    ("eval: not an export", "eval", ["--draft", "{empty_dir}"], r"holds no draft .*Fix:",
     "traceback (ValueError: Unrecognized model) after loading the target"),
    ("eval: zero gamma", "eval", ["--draft", "{export}", "--gamma", "0"], r"--gamma 0: must be at least 1",
     "traceback (ValueError) after loading the target"),
    ("eval: zero new tokens", "eval", ["--draft", "{export}", "--max-new-tokens", "0"],
     r"--max-new-tokens 0: must be at least 1", "loaded the target, measured nothing, rc 0"),
    ("eval: negative temperature", "eval", ["--draft", "{export}", "--temperature", "-1"],
     r"--temperature -1\.0: must be >= 0", "traceback (ValueError) after loading the target"),
    ("eval: dtype", "eval", ["--draft", "{export}", "--dtype", "float33"], r"--dtype float33 is not a torch dtype",
     "traceback (AttributeError: module 'torch' has no attribute 'float33')"),
    ("eval: prompts missing", "eval", ["--draft", "{export}", "--prompts", "/nonexistent/p.jsonl"],
     r"prompt file not found: /nonexistent/p\.jsonl\. Fix:", "traceback (FileNotFoundError)"),
    ("eval: unknown category", "eval", ["--draft", "{export}", "--categories", "nope"],
     r"no prompts in categories \['nope'\]\. Fix: choose from \[", "traceback (ValueError)"),
    ("eval: target missing", "eval", ["--draft", "{export}", "--target", "/nonexistent/model"],
     r"--target /nonexistent/model: no such file or directory\. Fix:",
     "traceback (OSError: Repo id must be in the form ...)"),
    ("eval: a tensor missing", "eval", ["--draft", "{missing_tensor}", "--target", "{target_dir}"],
     r"the weights do not match its config\.json \(missing \['model\.layers\.0\.mlp\.up_proj\.weight'\]\).*Fix:",
     "evaluated with a randomly initialised layer, rc 0"),
    ("eval: weights cut short", "eval", ["--draft", "{truncated}", "--target", "{target_dir}"],
     r"model\.safetensors cannot be read \(.*\): the file is cut short or damaged\. Fix:",
     "traceback (SafetensorError) after loading the target"),
    # --- draftkit.export: the validator and the upload's checks
    ("export: nothing there", "export", ["/nonexistent/run"], r"/nonexistent/run does not exist\. Fix:",
     "one line: 'holds no exported draft' (it does not exist)"),
    ("export: a run without an export", "export", ["{unfinished_run}"], r"holds no exported draft .*Fix:",
     "one line, exit 2"),
    ("export: a tensor missing", "export", ["{missing_tensor}"],
     r"the weights do not match its config\.json \(missing \['model\.layers\.0\.mlp\.up_proj\.weight'\]\)",
     "printed 'artifact: ...' as for a valid export, rc 0"),
    ("export: weights cut short", "export", ["{truncated}"], r"model\.safetensors cannot be read",
     "printed 'artifact: ...' as for a valid export, rc 0"),
    ("export: repo id", "export", ["{export}", "--push-to-hub", "notarepo"],
     r"repo id 'notarepo' is not of the form <user or org>/<name>\. Fix:", "one line, exit 2 (no fix named)"),
    # --- draftkit.preflight
    ("preflight: no recipe", "preflight", ["--world-size", "2"], r"no recipe chosen\. Fix:",
     "one line, exit 2 (no fix named)"),
    ("preflight: hostfile missing", "preflight", ["--hostfile", "/nonexistent/hosts", "+recipe=fastdraft"],
     r"hostfile /nonexistent/hosts does not exist\. Fix:", "one line, exit 2 (no fix named)"),
    ("preflight: zero steps", "preflight", ["+recipe=fastdraft", "engine.steps=0"],
     r"engine\.steps=0: must be a whole number >= 1", "printed the plan, rc 0"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files the probes name: data files, a tiny target, a standalone draft export and damaged copies of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from draftkit.export.lm import export_hf_draft
    from draftkit.targets.tiny import tiny_target

    root = tmp_path_factory.mktemp("bad_input")
    paths = {"root": root}
    paths["empty_prompts"] = root / "empty.jsonl"
    paths["empty_prompts"].write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "", "response": "an answer"}, {"prompt": "   ", "response": "x"},
        {"messages": [{"role": "user", "content": "\n"}]}]))
    paths["text_file"] = root / "text.jsonl"
    paths["text_file"].write_text('{"text": "plain prose"}\n')
    paths["bad_json"] = root / "bad.jsonl"
    paths["bad_json"].write_text('{"prompt": "hi", "response": "yo"}\n{"prompt": "hi"\n')
    paths["txt_file"] = root / "prompts.txt"
    paths["txt_file"].write_text("hello\n")
    paths["a_file"] = root / "a_file"
    paths["a_file"].write_text("")
    paths["empty_dir"] = root / "empty_dir"
    paths["empty_dir"].mkdir()

    target = tiny_target()
    paths["target_dir"] = root / "target"
    target.model.save_pretrained(paths["target_dir"])
    target.tokenizer.save_pretrained(paths["target_dir"])
    torch.manual_seed(0)
    draft = LlamaForCausalLM(LlamaConfig(vocab_size=target.vocab_size, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    paths["run_dir"] = root / "run"
    paths["export"] = export_hf_draft(draft, target.tokenizer, paths["run_dir"] / "export", target_name="tiny",
                                      target_vocab_size=target.vocab_size, recipe="fastdraft", num_assistant_tokens=3,
                                      resolved_config_yaml="")
    (paths["run_dir"] / "config.yaml").write_text("engine: {}\n")
    paths["unfinished_run"] = root / "unfinished_run"
    paths["unfinished_run"].mkdir()
    (paths["unfinished_run"] / "config.yaml").write_text("engine: {}\n")

    paths["missing_tensor"] = root / "missing_tensor"
    shutil.copytree(paths["export"], paths["missing_tensor"])
    weights = paths["missing_tensor"] / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    paths["truncated"] = root / "truncated"
    shutil.copytree(paths["export"], paths["truncated"])
    weights = paths["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return paths


def probe_argv(name, command, argv, inputs):
    argv = [a.format(**inputs) for a in argv]
    if command == "train":
        fresh = inputs["root"] / "runs" / re.sub(r"\W+", "_", name)
        if not any(a.startswith("hydra.run.dir=") for a in argv):
            argv.append(f"hydra.run.dir={fresh}")
        argv.append("+debug=tiny")
    if command == "eval" and "--target" not in argv:
        argv += ["--target", str(inputs["target_dir"])]
    if command == "eval":
        argv += ["--no-progress", "--max-new-tokens", "4"] if "--max-new-tokens" not in argv else ["--no-progress"]
    return argv


@pytest.mark.parametrize("name, command, argv, expected, before", PROBES, ids=[p[0] for p in PROBES])
def test_bad_input_ends_as_one_line_naming_the_fix(name, command, argv, expected, before, inputs, user_error,
                                                   monkeypatch):
    if not re.search("tensor missing|cut short", name):  # refused before any model is loaded
        def no_model(*args, **kwargs):
            raise AssertionError(f"{name}: a model was loaded")

        monkeypatch.setattr("draftkit.targets.tiny.tiny_target", no_model)
        monkeypatch.setattr("draftkit.eval.load_target", no_model)
    line = user_error(COMMANDS[command], probe_argv(name, command, argv, inputs))
    assert line.startswith(f"draftkit.{command}: ")
    assert re.search(expected, line), line


def test_a_sound_export_passes_the_validator(inputs, capsys):
    assert export_cli.main([str(inputs["run_dir"])]) == 0
    assert f"artifact: {inputs['export']}: 12 tensors in 1 file(s) readable and matching" in capsys.readouterr().out


# --- the run directory: one run at a time, continued only with its own config


def test_a_run_directory_in_use_is_refused_and_a_killed_runs_lock_does_not_block(inputs, tmp_path, user_error):
    from draftkit.engine.run import LOCK_FILE, run_dir_lock

    run_dir = tmp_path / "run"
    with run_dir_lock(run_dir):
        line = user_error(train_cli.main, ["+recipe=fastdraft", "+debug=tiny", f"hydra.run.dir={run_dir}"])
    assert re.search(rf"{run_dir} is in use by another run \(pid {os.getpid()} on .*\)\. Fix: wait for it", line)
    # a process that took the lock and was killed: the OS released it
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"), str(run_dir / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match="in use by another run"):
        with run_dir_lock(run_dir):
            pass
    holder.kill()
    holder.wait()
    with run_dir_lock(run_dir):
        assert (run_dir / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")


def test_a_run_directory_is_continued_only_with_its_config_unless_forced(inputs, tmp_path, user_error):
    from draftkit.config import compose
    from draftkit.engine.run import check_resume, record_run

    run_dir = tmp_path / "run"
    base = ["+recipe=fastdraft", "+debug=tiny", f"hydra.run.dir={run_dir}"]
    record_run(run_dir, compose(base))
    (run_dir / "selfdistill.jsonl").write_text("")  # work of the first run
    line = user_error(train_cli.main, [*base, "engine.lr=0.5", "data.max_length=64", "engine.steps=7"])
    # engine.lr reached both stages (what was typed wins); engine.steps may change: a longer run continues
    assert line.endswith(f"{run_dir} holds a run made with another config (data.max_length: 512 -> 64; engine.lr: "
                         "0.001 -> 0.5; fastdraft.finetune.engine.lr: 0.001 -> 0.5; fastdraft.pretrain.engine.lr: "
                         "0.003 -> 0.5). Fix: use a new hydra.run.dir, put the old values back, or add resume=force to "
                         "continue this run with the new values")
    assert check_resume(run_dir, compose([*base, "fastdraft.pretrain.engine.lr=0.5", "resume=force"])) == [
        "fastdraft.pretrain.engine.lr: 0.003 -> 0.5"]
    assert check_resume(run_dir, compose([*base, "engine.steps=7", "eval.max_new_tokens=4"])) == []
    # what resume allows is recorded, with how the run was started before
    first_start = json.loads((run_dir / "run_info.json").read_text())
    record_run(run_dir, compose([*base, "engine.steps=7"]))
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["changed_on_resume"] == [] and info["changed_safely_on_resume"] == [
        "engine.steps: 100 -> 7", "fastdraft.finetune.engine.steps: 80 -> 7",
        "fastdraft.pretrain.engine.steps: 120 -> 7"]
    assert info["earlier_starts"] == [{key: first_start[key] for key in (
        "argv", "started", "git", "changed_on_resume", "changed_safely_on_resume")}]
    # a directory with nothing done yet (a run that failed while starting) takes any config
    (run_dir / "selfdistill.jsonl").unlink()
    assert check_resume(run_dir, compose([*base, "engine.lr=0.5"])) == []


# --- what a run says when it stops


def test_a_divergence_names_its_checkpoint_and_the_suggested_fix_gets_past_it(inputs, tmp_path, user_error):
    run_dir = tmp_path / "run"
    base = ["+recipe=fastdraft", "+debug=tiny", f"hydra.run.dir={run_dir}", "fastdraft.stages=[pretrain]",
            "eval=none", "engine.max_grad_norm=null", "engine.save_every=1", "engine.warmup_steps=0"]
    line = user_error(train_cli.main, [*base, "engine.lr=1e6"])
    newest = run_dir / "pretrain" / "checkpoints" / "step_000001"
    assert re.search(rf"pretrain: the (loss|gradient norm) is nan at step 2; stopping\. The newest checkpoint, with "
                     rf"finite weights, is {newest}\. Fix: .*e\.g\. engine\.lr=100000 resume=force", line)
    # the fix as printed (a lower lr continues from that checkpoint, which here is already degenerate)
    line = user_error(train_cli.main, [*base, "engine.lr=100000", "resume=force"])
    assert re.search(rf"It resumed from {newest} and diverged again before its next checkpoint.*Fix: start over in "
                     r"a new run directory", line)
    # ... and that advice works
    fresh = tmp_path / "fresh"
    train_cli.main([*[a for a in base if not a.startswith("hydra.run.dir")], f"hydra.run.dir={fresh}",
                    "engine.lr=1e-3"])
    history = json.loads((fresh / "pretrain" / "history.json").read_text())
    assert len(history) == 3 and all(h["loss"] == h["loss"] for h in history)


def test_ctrl_c_prints_how_to_continue(inputs, tmp_path, monkeypatch, capsys):
    def interrupted(cfg, run_dir):
        (run_dir / "pretrain").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr("draftkit.recipes.fastdraft.run", interrupted)
    monkeypatch.chdir(tmp_path)  # the default run directory, relative: runs/<recipe>/<date>_<time>
    with pytest.raises(SystemExit) as stop:
        train_cli.main(["+recipe=fastdraft", "+debug=tiny", "engine.lr=0.002"])
    err = capsys.readouterr().err
    assert stop.value.code == 130 and "Traceback" not in err
    run_dir = next((tmp_path / "runs" / "fastdraft").iterdir())
    assert err.strip().splitlines()[-1] == (
        "draftkit.train: interrupted. To continue from its newest checkpoint, run: python -m draftkit.train "
        f"+recipe=fastdraft +debug=tiny engine.lr=0.002 hydra.run.dir=runs/fastdraft/{run_dir.name}")


def test_an_unknown_error_keeps_its_traceback_and_a_switch_shows_it_for_user_errors(inputs, tmp_path, monkeypatch,
                                                                                    capsys):
    from draftkit.errors import ConfigError

    def broken(cfg, run_dir):
        raise RuntimeError("a bug, not a mistake in the input")

    monkeypatch.setattr("draftkit.recipes.fastdraft.run", broken)
    with pytest.raises(SystemExit) as stop:
        train_cli.main(["+recipe=fastdraft", "+debug=tiny", f"hydra.run.dir={tmp_path / 'a'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" in err and "RuntimeError: a bug, not a mistake" in err
    monkeypatch.setenv("DRAFTKIT_DEBUG", "1")
    with pytest.raises(ConfigError, match="engine.steps=0"):
        train_cli.main(["+recipe=fastdraft", "+debug=tiny", "engine.steps=0", f"hydra.run.dir={tmp_path / 'b'}"])
