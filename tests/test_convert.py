"""`python -m draftkit.convert`: checkpoints in the official trainers' layouts (SafeAILab/EAGLE EAGLE-1,
FasterDecoding/Medusa's two layouts, zankner/Hydra) become draftkit artifacts whose drafters give the same outputs;
every bad input is one line naming the fix, exit code 2.

The reference layouts are written here from draftkit modules with the reference's tensor names, dtypes and configs
(what eagle/train/main.py, medusa/train/train_legacy.py and hydra/train/train.py save), so a conversion is checked
module output against module output. benchmarks/reference_parity.py also checks converted checkpoints of the real
trainers against the reference code's own modules.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from draftkit.convert import main as convert_main
from draftkit.drafts.fspad import feature_drafter
from draftkit.drafts.hydra_heads import hydra_heads
from draftkit.drafts.medusa import medusa_heads
from draftkit.export import fspad as fspad_export
from draftkit.export import hydra_heads as hydra_export
from draftkit.export import medusa as medusa_export


def randomised(module):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return module


def convert(kind, source, out, directory, *extra):
    return convert_main([kind, str(source), "--out", str(out), "--target", str(directory), *extra])


def inputs(target, length=7):
    torch.manual_seed(2)
    return torch.randn(2, length, target.hidden_size), torch.randint(0, target.vocab_size, (2, length))


# -------------------------------------------------------------------------------------------------------------- EAGLE-1

def eagle1_reference(target, folder, *, bias=True, rope_theta=50000.0, weights="pytorch_model.bin", embed=None):
    """An EAGLE-1 checkpoint as SafeAILab/EAGLE writes it: cnets.Model's state dict (fc with bias, layers.0 without
    input_layernorm, embed_tokens) in fp16, and a one-layer Llama config."""
    config = target.config
    draft = randomised(feature_drafter(
        embed_weight=target.embed_tokens.weight, lm_head_weight=target.lm_head.weight,
        num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
        intermediate_size=config.intermediate_size, rope_theta=rope_theta, rms_norm_eps=config.rms_norm_eps,
        feature_sampling=False, partial_alignment=False, fc_bias=bias))
    state = {k: v.detach().half() for k, v in draft.named_parameters() if v.requires_grad}
    state["embed_tokens.weight"] = (target.embed_tokens.weight if embed is None else embed).detach().half()
    folder.mkdir(parents=True, exist_ok=True)
    if weights.endswith(".bin"):
        torch.save(state, folder / weights)
    else:
        save_file(state, str(folder / weights))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": config.hidden_size, "num_hidden_layers": 1,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size, "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": rope_theta, "max_position_embeddings": 2048}))
    # what the reference computes with: the fp16 weights, upcast
    draft.load_state_dict({k: v.float() for k, v in state.items() if k != "embed_tokens.weight"}, strict=False)
    return draft


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_eagle1_checkpoint_converts_to_a_drafter_with_identical_outputs(tmp_path, target_dir, weights):
    directory, target = target_dir
    reference = eagle1_reference(target, tmp_path / "eagle", weights=weights)
    assert convert("eagle1", tmp_path / "eagle", tmp_path / "out", directory) == 0
    loaded = fspad_export.load(tmp_path / "out", target)
    info = json.loads((tmp_path / "out" / "draftkit.json").read_text())
    assert info["variant"] == "eagle1" and info["target_feature"]["norm"] == "post_norm"
    assert info["converted_from"]["format"] == "eagle1" and loaded.module.rope_theta == 50000.0
    assert (tmp_path / "out" / "eagle-sglang" / "model.safetensors").is_file()  # the layout that keeps the fc bias
    features, ids = inputs(target)
    with torch.no_grad():
        expected = reference(features, ids).predict
        got = loaded.module(features, ids).predict
    assert torch.equal(got, expected)


def test_eagle1_state_folder_takes_the_config_from_the_flag(tmp_path, target_dir):
    """main.py saves state_<n>/model.safetensors and keeps the config at its --configpath."""
    directory, target = target_dir
    eagle1_reference(target, tmp_path / "eagle", weights="model.safetensors")
    state = tmp_path / "cp" / "state_0"
    state.mkdir(parents=True)
    (tmp_path / "eagle" / "model.safetensors").rename(state / "model.safetensors")
    assert convert("eagle1", state, tmp_path / "out", directory) == 2
    assert convert("eagle1", state, tmp_path / "out", directory, "--config", str(tmp_path / "eagle" / "config.json")) == 0


def test_eagle1_without_rope_theta_uses_the_references_default(tmp_path, target_dir):
    directory, target = target_dir
    eagle1_reference(target, tmp_path / "eagle", rope_theta=10000.0)
    config = json.loads((tmp_path / "eagle" / "config.json").read_text())
    del config["rope_theta"]
    (tmp_path / "eagle" / "config.json").write_text(json.dumps(config))
    assert convert("eagle1", tmp_path / "eagle", tmp_path / "out", directory) == 0
    assert fspad_export.load(tmp_path / "out", target).module.rope_theta == 10000.0


# --------------------------------------------------------------------------------------------------------------- Medusa

def fasterdecoding_tensors(heads, prefix=""):
    """FasterDecoding's names for the medusa_head ModuleList (bf16, as train_legacy.py saves it)."""
    tensors = {}
    for h, block in enumerate(heads.blocks):
        for l, layer in enumerate(block.layers):
            tensors[f"{prefix}{h}.{l}.linear.weight"] = layer.weight.detach().bfloat16()
            tensors[f"{prefix}{h}.{l}.linear.bias"] = layer.bias.detach().bfloat16()
        if heads.lm_heads is not None:
            tensors[f"{prefix}{h}.{heads.num_layers}.weight"] = heads.lm_heads[h].weight.detach().bfloat16()
    return tensors


def medusa_reference(target, lm_head, num_layers=1):
    heads = randomised(medusa_heads(target.hidden_size, target.vocab_size, num_heads=3, num_layers=num_layers,
                                    lm_head=lm_head, lm_head_weight=target.lm_head.weight))
    if num_layers > 1:  # the reference repeats one ResBlock per head: its layers are one module
        for block in heads.blocks:
            for layer in block.layers[1:]:
                layer.load_state_dict(block.layers[0].state_dict())
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(p.bfloat16().float())
    return heads


def medusa_config(folder, heads, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"medusa_num_heads": heads.num_heads, "medusa_num_layers":
                                                    heads.num_layers, "base_model_name_or_path": "tiny", **extra}))


def medusa_outputs(heads, target):
    hidden, _ = inputs(target)
    with torch.no_grad():
        return heads(hidden, target.lm_head.weight)


@pytest.mark.parametrize("layout", ["train_legacy safetensors, shared LM head",
                                    "medusa_lm_head.pt, own LM heads, two tied layers"])
def test_medusa_head_files_convert_to_heads_with_identical_outputs(tmp_path, target_dir, layout):
    directory, target = target_dir
    shared = layout.startswith("train_legacy")
    heads = medusa_reference(target, "shared" if shared else "own", num_layers=1 if shared else 2)
    source = tmp_path / "medusa"
    medusa_config(source, heads, version="2" if shared else "1")
    if shared:
        save_file(fasterdecoding_tensors(heads), str(source / "medusa_lm_head.safetensors"))
    else:
        torch.save(fasterdecoding_tensors(heads), source / "medusa_lm_head.pt")
    assert convert("medusa", source, tmp_path / "out", directory) == 0
    loaded = medusa_export.load(tmp_path / "out", target).module
    assert loaded.lm_head_mode == ("shared" if shared else "own")
    assert torch.equal(medusa_outputs(loaded, target), medusa_outputs(heads, target))


def test_medusa_full_model_layout_converts_when_its_base_model_is_the_target(tmp_path, target_dir):
    directory, target = target_dir
    heads = medusa_reference(target, "own")
    source = tmp_path / "medusa2"
    source.mkdir()
    weights = {k: v.detach().clone() for k, v in target.model.state_dict().items() if k != "lm_head.weight"}
    weights.update(fasterdecoding_tensors(heads, prefix="medusa_head."))
    save_file(weights, str(source / "model.safetensors"))
    (source / "config.json").write_text(json.dumps({**target.config.to_dict(), "medusa_num_heads": 3,
                                                    "medusa_num_layers": 1}))
    assert convert("medusa", source, tmp_path / "out", directory) == 0
    loaded = medusa_export.load(tmp_path / "out", target).module
    assert torch.equal(medusa_outputs(loaded, target), medusa_outputs(heads, target))
    info = json.loads((tmp_path / "out" / "draftkit.json").read_text())
    assert info["converted_from"]["layout"] == "full model"


def test_medusa2_with_a_fine_tuned_base_model_is_refused_naming_the_fix(tmp_path, target_dir, capsys):
    directory, target = target_dir
    heads = medusa_reference(target, "own")
    source = tmp_path / "medusa2"
    source.mkdir()
    weights = {k: v.detach().clone() for k, v in target.model.state_dict().items() if k != "lm_head.weight"}
    weights["model.layers.0.mlp.up_proj.weight"] += 0.01
    weights.update(fasterdecoding_tensors(heads, prefix="medusa_head."))
    save_file(weights, str(source / "model.safetensors"))
    (source / "config.json").write_text(json.dumps({"medusa_num_heads": 3, "medusa_num_layers": 1}))
    assert convert("medusa", source, tmp_path / "out", directory) == 2
    assert "Medusa-2" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------- Hydra

def hydra_reference(target, folder, num_layers=1, arch="mlp", grounded=True, embed=None):
    """hydra/train/train.py's hydra_lm_head.pt (HydraMLP's state dict in bf16, the target's embedding included as
    input_embed_fn) and its HydraConfig."""
    heads = randomised(hydra_heads(target.hidden_size, target.vocab_size, num_heads=3, num_layers=num_layers,
                                   lm_head="own", lm_head_weight=target.lm_head.weight))
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(p.bfloat16().float())
        for i in range(3):  # the reference repeats one ResBlock after the first
            for layer in heads.rest[i].layers[1:]:
                layer.load_state_dict(heads.rest[i].layers[0].state_dict())
    state = {"input_embed_fn.weight": (target.embed_tokens.weight if embed is None else embed).detach().bfloat16()}
    for i in range(3):
        for part in ("linear", "res_connection"):
            for p in ("weight", "bias"):
                state[f"hydra_mlp.{i}.0.{part}.{p}"] = getattr(heads.first[i], part).state_dict()[p].bfloat16()
        for l, layer in enumerate(heads.rest[i].layers, start=1):
            state[f"hydra_mlp.{i}.{l}.linear.weight"] = layer.weight.detach().bfloat16()
            state[f"hydra_mlp.{i}.{l}.linear.bias"] = layer.bias.detach().bfloat16()
        state[f"hydra_lm_head.{i}.weight"] = heads.lm_heads[i].weight.detach().bfloat16()
        state[f"hydra_lm_head.{i}.bias"] = heads.lm_heads[i].bias.detach().bfloat16()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "hydra_lm_head.pt")
    (folder / "config.json").write_text(json.dumps({
        "hydra_num_heads": 3, "hydra_num_layers": num_layers, "hydra_head_arch": arch, "grounded_heads": grounded,
        "hidden_state_offset": 0, "base_model_name_or_path": "tiny"}))
    return heads


@pytest.mark.parametrize("num_layers", [1, 2])
def test_hydra_checkpoint_converts_to_heads_with_identical_outputs(tmp_path, target_dir, num_layers):
    directory, target = target_dir
    heads = hydra_reference(target, tmp_path / "hydra", num_layers=num_layers)
    assert convert("hydra", tmp_path / "hydra", tmp_path / "out", directory) == 0
    loaded = hydra_export.load(tmp_path / "out", target).module
    hidden, ids = inputs(target)
    with torch.no_grad():
        assert torch.equal(loaded(hidden, ids, target.embed_tokens), heads(hidden, ids, target.embed_tokens))


# ----------------------------------------------------------------------------------------------------------- bad input

def bad(tmp_path, target, case):
    """A source folder for each bad input, and the words its one-line error must contain."""
    source = tmp_path / "src"
    if case == "missing source":
        return "medusa", tmp_path / "nowhere", "does not exist"
    if case == "eagle1 without config":
        eagle1_reference(target, source)
        (source / "config.json").unlink()
        return "eagle1", source, "Fix: pass --config"
    if case == "eagle3 checkpoint":
        source.mkdir()
        torch.save({"midlayer.self_attn.q_proj.weight": torch.zeros(4, 4), "d2t": torch.zeros(4)},
                   source / "pytorch_model.bin")
        (source / "config.json").write_text(json.dumps({"hidden_size": target.hidden_size}))
        return "eagle1", source, "EAGLE-3"
    if case == "eagle1 for another target":
        eagle1_reference(target, source, embed=torch.randn_like(target.embed_tokens.weight))
        return "eagle1", source, "trained on another model"
    if case == "eagle1 rope scaling":
        eagle1_reference(target, source)
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "linear", "factor": 2.0}}))
        return "eagle1", source, "RoPE scaling"
    if case == "medusa head count differs from config":
        heads = medusa_reference(target, "shared")
        medusa_config(source, heads, medusa_num_heads=2)
        save_file(fasterdecoding_tensors(heads), str(source / "medusa_lm_head.safetensors"))
        return "medusa", source, "medusa_num_heads"
    if case == "medusa without config":
        source.mkdir()
        return "medusa", source, "no config.json"
    if case == "not a pickle of tensors":
        heads = medusa_reference(target, "shared")
        medusa_config(source, heads)
        (source / "medusa_lm_head.pt").write_bytes(b"not a pickle")
        return "medusa", source, "not a state dict of tensors"
    if case == "hydra++ prefix-mlp":
        hydra_reference(target, source, arch="prefix-mlp")
        return "hydra", source, "final RMSNorm"
    if case == "hydra ungrounded":
        hydra_reference(target, source, grounded=False)
        return "hydra", source, "grounded_heads=False"
    if case == "hydra for another target":
        hydra_reference(target, source, embed=torch.randn_like(target.embed_tokens.weight))
        return "hydra", source, "trained on another model"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing source", "eagle1 without config", "eagle3 checkpoint", "eagle1 for another target", "eagle1 rope scaling",
    "medusa head count differs from config", "medusa without config", "not a pickle of tensors", "hydra++ prefix-mlp",
    "hydra ungrounded", "hydra for another target"])
def test_bad_input_is_one_line_naming_the_fix_and_exit_code_2(tmp_path, target_dir, capsys, case):
    directory, target = target_dir
    kind, source, words = bad(tmp_path, target, case)
    assert convert(kind, source, tmp_path / "out", directory) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("draftkit.convert: ") and "\n" not in err and "Fix: " in err and words in err
    assert not (tmp_path / "out").exists()


def test_config_flag_is_refused_for_heads(tmp_path, target_dir, capsys):
    directory, target = target_dir
    hydra_reference(target, tmp_path / "hydra")
    assert convert("hydra", tmp_path / "hydra", tmp_path / "out", directory, "--config", "x.json") == 2
    assert "--config applies to eagle1" in capsys.readouterr().err


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        convert_main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--target", "--config", "eagle1", "medusa", "hydra"):
        assert flag in text
