"""Every config composes, every `_target_` binds its arguments, overlays work in either order."""

import dataclasses
import importlib
import inspect
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from draftkit.config import ConfigError, available_recipes, compose, prepare_overrides
from draftkit.engine.loop import LoopSettings

ROOT = Path(__file__).resolve().parents[1]
RECIPE_FILES = sorted((ROOT / "conf" / "recipe").glob("*.yaml"))
GROUP_FILES = sorted(p for p in (ROOT / "conf").glob("*/*.yaml") if p.parent.name not in ("recipe", "debug", "budget"))
BUDGETS = sorted(p.stem for p in (ROOT / "conf" / "budget").glob("*.yaml"))


def test_recipes_are_discovered_from_the_conf_tree():
    assert available_recipes() == [p.stem for p in RECIPE_FILES]
    assert len(RECIPE_FILES) >= 1


@pytest.mark.parametrize("recipe", [p.stem for p in RECIPE_FILES])
@pytest.mark.parametrize("debug_first", [False, True])
def test_debug_overlay_wins_in_either_order(recipe, debug_first):
    overrides = ["+debug=tiny", f"+recipe={recipe}"] if debug_first else [f"+recipe={recipe}", "+debug=tiny"]
    cfg = compose(overrides)
    assert cfg.target._target_.endswith("tiny_target")
    assert cfg.engine.max_steps_per_stage == 3
    assert cfg.logger._target_.endswith("NullSink")


def _leaf_keys(node, path="") -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_leaf_keys(v, f"{path}.{k}" if path else k) for k, v in node.items())) if node else {path}
    return {path}


@pytest.mark.parametrize("recipe", [p.stem for p in RECIPE_FILES])
@pytest.mark.parametrize("budget", BUDGETS)
def test_a_budget_only_changes_settings_the_recipe_has(recipe, budget):
    """A budget file sets values, never new keys: a misspelt key would otherwise be recorded and silently unused. A
    stage's `engine` mapping may set any engine setting (the loop's fields)."""
    plain = OmegaConf.to_container(compose([f"+recipe={recipe}"]), resolve=False)
    budgeted = OmegaConf.to_container(compose([f"budget={budget}", f"+recipe={recipe}"]), resolve=False)
    engine_fields = {f.name for f in dataclasses.fields(LoopSettings)}
    new = {k for k in _leaf_keys(budgeted) - _leaf_keys(plain)
           if not (k.split(".")[-2:-1] == ["engine"] and k.split(".")[-1] in engine_fields)}
    assert new == set()
    assert budgeted != plain


def test_gpu30_merges_the_recipes_own_budget_after_the_shared_one_and_typed_values_win():
    cfg = compose(["+recipe=fspad", "budget=gpu30"])
    assert cfg.fspad.train.engine.steps == 10000 and cfg.data.selfdistill.num_prompts == 16384
    assert cfg.engine.precision == "bf16" and cfg.engine.group_by_length is True
    typed = compose(["+recipe=fspad", "budget=gpu30", "fspad.train.engine.steps=7", "engine.precision=fp32"])
    assert typed.fspad.train.engine.steps == 7 and typed.engine.precision == "fp32"
    assert compose(["+recipe=medusa", "+budget=gpu30"]).engine.steps == 7000


def test_debug_shrinks_a_budget_in_either_order():
    for overrides in (["+debug=tiny", "budget=gpu30", "+recipe=medusa"],
                      ["+recipe=medusa", "budget=gpu30", "+debug=tiny"]):
        cfg = compose(overrides)
        assert cfg.engine.max_steps_per_stage == 3 and cfg.data.selfdistill.num_prompts == 6


def test_an_unknown_budget_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown budget 'gpu3'; available budgets: gpu30, smoke"):
        prepare_overrides(["+recipe=medusa", "budget=gpu3"])


def _targets(node, path=""):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            if not OmegaConf.is_missing(node, key):
                yield from _targets(node[key], f"{path}.{key}" if path else key)


# What the recipes pass at instantiate time, on top of the config's own keys.
CALL_SITE_ARGS = {
    "draft": {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "target_embedding", "target_model"},
    "logger": {"run_dir", "run_config", "run_name"},
    "medusa.heads": {"hidden_size", "vocab_size", "lm_head_weight"},
    "hydra_heads.heads": {"hidden_size", "vocab_size", "target_config", "lm_head_weight"},
    "clover.model": {"hidden_size", "target_config", "init_layer", "final_norm"},
}


def _check_binds(cfg):
    for path, node in _targets(cfg):
        fn = get_method(node._target_)
        kwargs = {k: None for k in node if not k.startswith("_")}
        kwargs.update({k: None for k in CALL_SITE_ARGS.get(path, ())})
        inspect.signature(fn).bind(**kwargs)


@pytest.mark.parametrize("recipe", [p.stem for p in RECIPE_FILES])
def test_every_target_of_every_recipe_binds(recipe):
    for overlay in ([], ["+debug=tiny"]):
        cfg = compose([f"+recipe={recipe}", *overlay])
        _check_binds(cfg)


@pytest.mark.parametrize("group_file", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_group_option_composes(group_file):
    group, option = group_file.parent.name, group_file.stem
    cfg = compose([f"+recipe={RECIPE_FILES[0].stem}", f"{group}={option}"])
    OmegaConf.to_container(cfg[group], resolve=True)  # interpolations resolve (a `${.x}` inside a list would not)
    node = cfg
    if "_target_" in node[group]:
        fn = get_method(node[group]._target_)
        kwargs = {k: None for k in node[group] if not k.startswith("_")}
        kwargs.update({k: None for k in CALL_SITE_ARGS.get(group, ())})
        inspect.signature(fn).bind(**kwargs)


def test_a_typo_in_a_target_argument_is_caught():
    cfg = compose(["+recipe=fastdraft", "+draft.hidden_sise=3"])
    with pytest.raises(TypeError, match="hidden_sise"):
        _check_binds(OmegaConf.masked_copy(cfg, ["draft"]))


def test_each_recipe_has_its_module_card_and_test():
    for path in RECIPE_FILES:
        module = importlib.import_module(f"draftkit.recipes.{path.stem}")
        assert callable(module.run) and callable(module.validate)
        assert (ROOT / "recipes" / f"{path.stem}.md").is_file()
        assert (ROOT / "tests" / f"test_recipe_{path.stem}.py").is_file()


def test_recipe_errors_name_the_fix():
    with pytest.raises(ConfigError, match="available recipes: .*fastdraft"):
        prepare_overrides(["+recipe=nope"])
    with pytest.raises(ConfigError, match=r"Fix: add \+recipe=<name>"):
        prepare_overrides(["engine.lr=1"])
    with pytest.raises(ConfigError, match=r"\+recipe=<name>"):
        prepare_overrides(["recipe=fastdraft"])


def test_unknown_recipe_on_the_command_line_is_one_clear_error():
    proc = subprocess.run([sys.executable, "-m", "draftkit.train", "+recipe=no_such_recipe"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    listed = ", ".join(p.stem for p in RECIPE_FILES)
    assert f"unknown recipe 'no_such_recipe'; available recipes: {listed}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_wheel_ships_the_conf_tree(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("draftkit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in RECIPE_FILES + GROUP_FILES + [ROOT / "conf" / "train.yaml", ROOT / "conf" / "debug" / "tiny.yaml"]:
        assert "draftkit/conf/" + str(path.relative_to(ROOT / "conf")) in names


def test_cfg_job_prints_the_composed_config_with_overlays_in_any_order():
    proc = subprocess.run([sys.executable, "-m", "draftkit.train", "--cfg", "job", "+debug=tiny", "+recipe=fastdraft"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "_target_: draftkit.targets.tiny.tiny_target" in proc.stdout
    assert "max_steps_per_stage: 3" in proc.stdout


def test_cfg_job_prints_the_config_that_runs_with_the_typed_value_in_every_stage():
    proc = subprocess.run([sys.executable, "-m", "draftkit.train", "+recipe=fastdraft", "engine.lr=1e-4", "--cfg", "job"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]
    printed = OmegaConf.create(proc.stdout)
    assert printed.engine.lr == printed.fastdraft.pretrain.engine.lr == printed.fastdraft.finetune.engine.lr == 1e-4


def _stage(cfg, path):
    from draftkit.engine.loop import stage_settings

    engine = OmegaConf.to_container(cfg.engine, resolve=True)
    return stage_settings(engine, path, **OmegaConf.to_container(OmegaConf.select(cfg, path), resolve=True))


def test_a_typed_engine_value_reaches_every_stage_unless_the_stage_key_is_typed_too():
    untyped = compose(["+recipe=fastdraft"])
    assert (_stage(untyped, "fastdraft.pretrain.engine").steps, _stage(untyped, "fastdraft.pretrain.engine").lr) == \
        (120, 3e-3)
    cfg = compose(["+recipe=fastdraft", "engine.steps=5000", "engine.lr=1e-5"])
    for stage in ("fastdraft.pretrain.engine", "fastdraft.finetune.engine"):
        assert (_stage(cfg, stage).steps, _stage(cfg, stage).lr) == (5000, 1e-5)
        assert OmegaConf.select(cfg, f"{stage}.lr") == 1e-5  # recorded as used: config.yaml is this config
    assert _stage(cfg, "fastdraft.pretrain.engine").warmup_steps == 12  # untyped keys keep the stage's own value
    both = compose(["+recipe=fastdraft", "engine.lr=1e-4", "fastdraft.pretrain.engine.lr=3e-3"])
    assert (_stage(both, "fastdraft.pretrain.engine").lr, _stage(both, "fastdraft.finetune.engine").lr) == (3e-3, 1e-4)
    assert _stage(compose(["+recipe=fspad", "engine.steps=500"]), "fspad.train.engine").steps == 500
    # a budget's per-stage steps are defaults too: what the user typed wins over them
    budgeted = compose(["+recipe=fastdraft", "budget=gpu30", "engine.steps=7"])
    assert _stage(budgeted, "fastdraft.finetune.engine").steps == 7


def test_typed_values_are_checked_against_their_settings_type():
    with pytest.raises(ConfigError, match=r"engine\.steps=2\.5: must be a whole number"):
        compose(["+recipe=fastdraft", "engine.steps=2.5"])
    with pytest.raises(ConfigError, match=r"engine\.group_by_length=1: must be true or false"):
        compose(["+recipe=fastdraft", "engine.group_by_length=1"])
    with pytest.raises(ConfigError, match=r"fastdraft\.stages='pretrain': must be a list"):
        compose(["+recipe=fastdraft", "fastdraft.stages=pretrain"])
    assert compose(["+recipe=fastdraft", "engine.lr=1"]).engine.lr == 1  # an int where a float is expected is fine
    assert compose(["+recipe=fastdraft", "engine.max_grad_norm=null"]).engine.max_grad_norm is None
    assert compose(["+recipe=fastdraft", "resume=force"]).resume == "force"


def test_the_shared_data_group_passes_the_checks_with_its_root_interpolated(tmp_path):
    """data=shared names its files as ${data.root}/...: the checks must see the resolved paths."""
    import gzip
    import json

    from draftkit.config import validate
    from draftkit.errors import UserError

    for name in ("pretrain/gutenberg_books.jsonl.gz", "pretrain/us_presidential_speeches.jsonl.gz",
                 "sharegpt/sharegpt_v3_slice.jsonl.gz", "gsm8k/train.jsonl.gz"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(tmp_path / name, "wt") as f:
            f.write(json.dumps({"question": "What is 2 + 2?", "answer": "4"}) + "\n")
    (tmp_path / "spec_bench").mkdir()
    (tmp_path / "spec_bench" / "question.jsonl").write_text(
        json.dumps({"question_id": 1, "category": "qa", "turns": ["Hi"]}) + "\n")
    validate(compose(["+recipe=fastdraft", "data=shared", f"data.root={tmp_path}"]))
    from draftkit.recipes import fastdraft

    with pytest.raises(UserError, match=f"data file not found: {tmp_path}/pretrain/gutenberg_books"):
        (tmp_path / "pretrain" / "gutenberg_books.jsonl.gz").unlink()
        fastdraft.validate(compose(["+recipe=fastdraft", "data=shared", f"data.root={tmp_path}"]))


def test_preparing_overrides_twice_changes_nothing():
    """The CLI prepares the overrides, composes them to check the run, then hands the same list to Hydra."""
    once = prepare_overrides(["budget=gpu30", "+recipe=fspad", "+debug=tiny", "engine.lr=0.1"])
    assert prepare_overrides(once) == once
    assert once[-3:] == ["+budget=gpu30", "+budget/gpu30@_global_=fspad", "+debug=tiny"]


def test_pretraining_text_is_checked_only_where_a_recipe_reads_it(tmp_path):
    from draftkit.config import validate

    missing = [f"data.pretrain=[{tmp_path / 'gone.jsonl.gz'}]"]
    validate(compose(["+recipe=fspad", *missing]))  # fspad never opens data.pretrain
    from draftkit.errors import UserError
    from draftkit.recipes import fastdraft

    with pytest.raises(UserError, match="data.pretrain: data file not found"):
        fastdraft.validate(compose(["+recipe=fastdraft", *missing]))
    fastdraft.validate(compose(["+recipe=fastdraft", "fastdraft.stages=[finetune]", *missing]))
