"""Export feature drafters (EAGLE-1 / FSPAD): draftkit's own format, and EAGLE-1 for vLLM and SGLang.

Layout of `<out>/` (written atomically: a staging folder, then one rename):
  config.json, model.safetensors, manifest.json, draftkit.json, draftkit_config.yaml, README.md
      draftkit format: every trained tensor (FSPAD's `feature_sampling.*` and 2h `down_proj` included) in fp32, plus the
      architecture, the switches and which target feature (norm, layer) the draft reads.
  eagle-vllm/    (EAGLE-1 on post-norm features only) vLLM's llama_eagle.py layout: `fc.weight` without bias (vLLM
                 V1 builds fc with bias=False and loads strictly) and layers.0.* without input_layernorm, in bf16;
                 config.json a one-layer Llama config (architectures LlamaForCausalLM: vLLM swaps in EagleLlamaForCausalLM itself).
  eagle-sglang/  the same plus an all-zero `fc.bias`: SGLang's LlamaForCausalLMEagle builds fc as nn.Linear(2H, H) with
                 a bias it always loads; config.json names that class, since SGLang picks the draft's model class from
                 `architectures` and has no rewrite from LlamaForCausalLM for EAGLE-1 drafts.
Neither config carries a "bias" key: vLLM's and SGLang's Llama layers read `attention_bias or bias` as the attention
bias, which would create q/k/v/o biases that no tensor fills. Neither folder stores the embedding: the drafter never
trains it, and without `embed_tokens.weight` both runtimes use the target's own (vLLM's proposer shares it when the
checkpoint has none, SGLang's EAGLE worker always replaces the draft's with the target's), where a stored bf16 copy would
be rounded and, in vLLM, kept as a separate table. Both carry the target's max_position_embeddings.
A draft with a restricted draft vocabulary (drafts/vocab.py) also stores `token_map` (int64 [size], ascending target
ids) in draftkit's model.safetensors, and eagle-sglang/ gets `token_map.pt` for SGLang's FR-Spec flag
`--speculative-token-map`: SGLang reads that file with torch.load(weights_only=True) as the absolute target ids of the
kept vocabulary, slices the target's LM head rows with it (draft id i = target id token_map[i]) and maps the draft's
top-k ids back through it. vLLM's EAGLE-1 loader scores the target's full LM head and has no truncated vocabulary, so
eagle-vllm/ is not written for such a draft (and refused when asked for).
Every folder has manifest.json (key -> shape, dtype) and is checked against the exact key set of its format before
it is written; loading checks it again. FSPAD's feature sampling and split output have no slot in either runtime's
EAGLE loader, so FSPAD drafts ship in the draftkit format only (draftkit.json says why).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from draftkit.drafts.fspad import FeatureDrafter, feature_drafter
from draftkit.export.artifact import (
    ArtifactError,
    LoadedDraft,
    read_model_weights,
    read_tensor_file,
    require_same_as_target,
)
from draftkit.export.card import draftkit_target, model_card, target_load_name
from draftkit.io import staged_directory

FAMILY = "fspad"
FORMATS = ("draftkit", "eagle-vllm", "eagle-sglang")
EAGLE_FORMATS = FORMATS[1:]
SGLANG_TOKEN_MAP = "token_map.pt"


def format_refusal(fmt: str, *, eagle1: bool, feature_norm: str, restricted_vocab: bool) -> str | None:
    """Why the EAGLE format `fmt` cannot hold a draft like this one, with the fix; None when it can."""
    if fmt not in EAGLE_FORMATS:
        raise ValueError(f"unknown EAGLE format {fmt!r}: choose from {list(EAGLE_FORMATS)}")
    if not eagle1:
        return ("vLLM/SGLang EAGLE loaders have no slot for FSPAD's feature sampling or split 2h output. Fix: use the "
                "draftkit format, or train EAGLE-1 (fspad.feature_sampling=false fspad.partial_alignment=false)")
    if feature_norm != "post_norm":
        return "EAGLE runtimes feed post-norm features. Fix: train with fspad.features.norm=post_norm"
    if restricted_vocab and fmt == "eagle-vllm":
        return ("vLLM's EAGLE-1 loader scores the target's full LM head and has no truncated vocabulary, so it cannot "
                "serve a draft trained on a restricted draft vocabulary. Fix: train with fspad.draft_vocab_size=null "
                "for vLLM, or serve this draft with SGLang (eagle-sglang with --speculative-token-map)")
    return None


def architecture(draft: FeatureDrafter) -> dict:
    return {
        "hidden_size": draft.hidden_size, "vocab_size": draft.vocab_size, "num_attention_heads": draft.num_heads,
        "num_key_value_heads": draft.num_kv_heads, "intermediate_size": draft.intermediate_size,
        "rope_theta": draft.rope_theta, "rms_norm_eps": draft.rms_norm_eps,
        "feature_sampling": draft.feature_sampling is not None, "partial_alignment": draft.partial_alignment,
        "fc_bias": draft.fc.bias is not None,
        "draft_vocab_size": None if draft.token_map is None else draft.draft_vocab_size,
        "embedding_trained": draft.embed_tokens.weight.requires_grad,
    }


def _stores_embedding(arch: dict, fmt: str) -> bool:
    """A folder stores embed_tokens.weight only when the drafter trained it; EAGLE folders written before that rule
    (no "embedding_trained" recorded) stored a frozen bf16 copy of the target's."""
    if "embedding_trained" in arch:
        return arch["embedding_trained"]
    return fmt in EAGLE_FORMATS


def expected_keys(arch: dict, fmt: str) -> dict[str, list[int]]:
    """The exact tensor names and shapes of each format; anything else in a file is an error."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown feature-drafter format {fmt!r}: {FORMATS}")
    h, i = arch["hidden_size"], arch["intermediate_size"]
    d = h // arch["num_attention_heads"]
    keys = {
        "fc.weight": [h, 2 * h],
        "layers.0.self_attn.q_proj.weight": [arch["num_attention_heads"] * d, h],
        "layers.0.self_attn.k_proj.weight": [arch["num_key_value_heads"] * d, h],
        "layers.0.self_attn.v_proj.weight": [arch["num_key_value_heads"] * d, h],
        "layers.0.self_attn.o_proj.weight": [h, arch["num_attention_heads"] * d],
        "layers.0.mlp.gate_proj.weight": [i, h],
        "layers.0.mlp.up_proj.weight": [i, h],
        "layers.0.mlp.down_proj.weight": [2 * h if arch["partial_alignment"] else h, i],
        "layers.0.post_attention_layernorm.weight": [h],
    }
    if _stores_embedding(arch, fmt):
        keys["embed_tokens.weight"] = [arch["vocab_size"], h]
    if fmt == "draftkit":
        if arch.get("draft_vocab_size") is not None:
            keys["token_map"] = [arch["draft_vocab_size"]]
        if arch["fc_bias"]:
            keys["fc.bias"] = [h]
        if arch["feature_sampling"]:
            keys.update({"feature_sampling.norm.weight": [h], "feature_sampling.gate_proj.weight": [i, h],
                         "feature_sampling.up_proj.weight": [i, h], "feature_sampling.down_proj.weight": [h, i]})
        return keys
    if fmt == "eagle-sglang":
        keys["fc.bias"] = [h]
    return keys


def check_keys(tensors: dict[str, torch.Tensor], expected: dict[str, list[int]], where: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if list(tensors[k].shape) != expected[k])
    if missing or unknown or wrong:
        raise ValueError(f"{where}: tensors do not match the format: missing {missing}, unknown {unknown}, wrong "
                         f"shape {[(k, list(tensors[k].shape), expected[k]) for k in wrong]}")


def trained_tensors(draft: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trained parameter of a feature drafter, fp32 on the CPU (the draftkit format's tensors)."""
    return {name: p.detach().float().cpu().contiguous() for name, p in draft.named_parameters() if p.requires_grad}


def draftkit_tensors(draft: torch.nn.Module) -> dict[str, torch.Tensor]:
    """trained_tensors plus the draft vocabulary's `token_map`, when the draft has one."""
    tensors = trained_tensors(draft)
    if draft.token_map is not None:
        tensors["token_map"] = draft.token_map.detach().long().cpu().contiguous()
    return tensors


def eagle_tensors(draft: FeatureDrafter, fmt: str) -> dict[str, torch.Tensor]:
    # The feature norm is the exporter's to check: the module cannot tell which feature it was trained on.
    why_not = format_refusal(fmt, eagle1=draft.variant == "eagle1", feature_norm="post_norm",
                             restricted_vocab=draft.token_map is not None)
    if why_not is not None:
        raise ValueError(f"the {draft.variant} draft cannot be written in the {fmt} format: {why_not}")
    tensors = {k: v.to(torch.bfloat16) for k, v in trained_tensors(draft).items() if k != "fc.bias"}
    bias = draft.fc.bias.detach().float().cpu() if draft.fc.bias is not None else None
    if fmt == "eagle-vllm" and bias is not None and bias.abs().max() > 0:
        raise ValueError("this draft was trained with a non-zero fc bias, which vLLM's EAGLE loader cannot hold. "
                         "Fix: train with fspad.fc_bias=false (the default)")
    if fmt == "eagle-sglang":
        tensors["fc.bias"] = (bias if bias is not None else torch.zeros(draft.hidden_size)).to(torch.bfloat16)
    return tensors


# The model class each runtime builds the draft with: vLLM maps LlamaForCausalLM to its EAGLE class for method "eagle";
# SGLang instantiates the class `architectures` names.
EAGLE_ARCHITECTURES = {"eagle-vllm": "LlamaForCausalLM", "eagle-sglang": "LlamaForCausalLMEagle"}


def _llama_config(arch: dict, feature: dict, max_position_embeddings: int, fmt: str) -> dict:
    return {
        "architectures": [EAGLE_ARCHITECTURES[fmt]], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": arch["hidden_size"], "intermediate_size": arch["intermediate_size"],
        "num_attention_heads": arch["num_attention_heads"], "num_key_value_heads": arch["num_key_value_heads"],
        "head_dim": arch["hidden_size"] // arch["num_attention_heads"], "vocab_size": arch["vocab_size"],
        "rope_theta": arch["rope_theta"], "rms_norm_eps": arch["rms_norm_eps"], "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False, "draftkit_target_feature": feature,
    }


def write_format_dir(folder: Path, tensors: dict, expected: dict, config: dict, info: dict) -> None:
    """One format's folder: tensors checked against the exact key set, then model.safetensors, config.json, a
    key/shape manifest.json and draftkit.json."""
    check_keys(tensors, expected, str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    manifest = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (folder / "draftkit.json").write_text(json.dumps(info, indent=2) + "\n")


def _card(fmt: str, shown_as: str, *, variant: str, target_name: str, target_reference: dict | None, norm: str,
          layer: int, params: int, eval_table: str, folders: list[str], num_speculative_tokens: int,
          restricted_vocab: bool) -> str:
    """The model card of one folder: the draftkit format's lists the others; each EAGLE folder's says how to serve it."""
    load = target_load_name(target_name, target_reference)
    summary = (f"A {variant} feature drafter for speculative decoding, trained with draftkit (recipe `fspad`). It "
               f"reads the target's {norm} feature of layer {layer} and the next token's embedding, and uses the "
               f"target's own embedding and LM head, which are not stored here. Trained parameters: {params:,}.")
    evaluate = ("draftkit (any folder of this export)", "bash",
                f"python -m draftkit.eval --draft {shown_as} --target {draftkit_target(target_name, target_reference)}")
    if fmt == "draftkit":
        return model_card(title=f"{variant} drafter for {load} (draftkit format)", summary=summary,
                          target_name=target_name, target_reference=target_reference, eval_table=eval_table,
                          usage=[evaluate], tags=["fspad", variant],
                          extra="## Folders\n\n- this folder: draftkit's format (every trained tensor, fp32).\n"
                                + "\n".join(folders))
    return model_card(title=f"{variant} drafter for {load} ({fmt})", summary=summary, target_name=target_name,
                      target_reference=target_reference, eval_table=eval_table, tags=["fspad", variant, fmt],
                      usage=[(fmt.replace("eagle-", "").replace("vllm", "vLLM").replace("sglang", "SGLang"), "bash",
                              _serve_command(fmt, load, shown_as, num_speculative_tokens, restricted_vocab)),
                             evaluate])


def export_feature_drafter(
    draft: FeatureDrafter,
    out_dir: Path,
    *,
    target_name: str,
    feature_norm: str,
    feature_layer: int,
    target_vocab_size: int,
    max_position_embeddings: int,
    num_speculative_tokens: int,
    resolved_config_yaml: str,
    eval_table_md: str = "",
    eagle_formats: Sequence[str] | None = None,
    extra_info: dict | None = None,
    target_reference: dict | None = None,
) -> dict[str, Path]:
    """Write the export folder(s); returns {format: folder}. eagle_formats: the EAGLE folders to write besides
    draftkit's; None writes every one that can hold this draft (and says in draftkit.json why the others are not
    written), an explicit list refuses a format that cannot. extra_info: more keys for every draftkit.json."""
    if draft.vocab_size != target_vocab_size:
        raise ValueError(f"draft vocab {draft.vocab_size} != target vocab_size {target_vocab_size}")
    arch = architecture(draft)
    feature = {"norm": feature_norm, "layer": feature_layer}
    refusals = {fmt: format_refusal(fmt, eagle1=draft.variant == "eagle1", feature_norm=feature_norm,
                                    restricted_vocab=draft.token_map is not None) for fmt in EAGLE_FORMATS}
    unknown = [fmt for fmt in eagle_formats or () if fmt not in EAGLE_FORMATS]
    if unknown:
        raise ValueError(f"unknown EAGLE export format(s) {unknown}: choose from {list(EAGLE_FORMATS)}")
    refused = [fmt for fmt in eagle_formats or () if refusals[fmt] is not None]
    if refused:
        raise ValueError(f"the {draft.variant} draft cannot be written in the {refused[0]} format: "
                         f"{refusals[refused[0]]}")
    chosen = [fmt for fmt in EAGLE_FORMATS if refusals[fmt] is None and (eagle_formats is None or fmt in eagle_formats)]
    not_written = {fmt: why for fmt, why in refusals.items() if why is not None}
    out_dir = Path(out_dir)
    written = {"draftkit": out_dir}
    base_info = {"family": FAMILY, "variant": draft.variant, "target": target_name, "target_feature": feature,
                 "architecture": arch, "num_speculative_tokens": num_speculative_tokens, **(extra_info or {})}
    reasons = "; ".join(dict.fromkeys(not_written.values()))
    with staged_directory(out_dir) as staging:
        write_format_dir(staging, draftkit_tensors(draft), expected_keys(arch, "draftkit"),
                   {**arch, "architectures": ["DraftkitFeatureDrafter"], "target_feature": feature,
                    "max_position_embeddings": max_position_embeddings},
                   {**base_info, "format": "draftkit", "eagle_exports": chosen or f"not written: {reasons}",
                    **({"not_written": not_written} if not_written else {})})
        if chosen:
            folders = [f"- `{fmt}/` not written: {why}." for fmt, why in not_written.items()]
        else:
            folders = [f"- no EAGLE folders: {reasons}."] if reasons else []
        params = sum(p.numel() for p in draft.parameters() if p.requires_grad)
        card = partial(_card, variant=draft.variant, target_name=target_name, target_reference=target_reference,
                       norm=feature_norm, layer=feature_layer, params=params, eval_table=eval_table_md,
                       num_speculative_tokens=num_speculative_tokens, restricted_vocab=draft.token_map is not None)
        for fmt in chosen:
            sglang_token_map = fmt == "eagle-sglang" and draft.token_map is not None
            write_format_dir(staging / fmt, eagle_tensors(draft, fmt), expected_keys(arch, fmt),
                       _llama_config(arch, feature, max_position_embeddings, fmt),
                       {**base_info, "format": fmt, **({"token_map": SGLANG_TOKEN_MAP} if sglang_token_map else {})})
            if sglang_token_map:
                torch.save(draft.token_map.detach().long().cpu().clone(), staging / fmt / SGLANG_TOKEN_MAP)
            written[fmt] = out_dir / fmt
            (staging / fmt / "README.md").write_text(card(fmt, str(out_dir / fmt), folders=[]))
            folders.append(f"- `{fmt}/`: for {'vLLM' if fmt == 'eagle-vllm' else 'SGLang'}, with its own card.")
        (staging / "draftkit_config.yaml").write_text(resolved_config_yaml)
        (staging / "README.md").write_text(card("draftkit", str(out_dir), folders=folders))
    return written


def _serve_command(fmt: str, target: str, folder: str, num_speculative_tokens: int, restricted_vocab: bool) -> str:
    if fmt == "eagle-vllm":
        return (f"vllm serve {target} --speculative-config '{{\"method\": \"eagle\", \"model\": \"{folder}\", "
                f"\"num_speculative_tokens\": {num_speculative_tokens}}}'")
    token_map = f" --speculative-token-map {folder}/{SGLANG_TOKEN_MAP}" if restricted_vocab else ""
    return (f"python -m sglang.launch_server --model {target} --speculative-algorithm EAGLE "
            f"--speculative-draft-model-path {folder} --speculative-num-steps {num_speculative_tokens}{token_map}")


def read_format_dir(folder: Path, family: str, expected_keys, embed_weight: torch.Tensor) -> tuple[dict, dict]:
    """(draftkit.json, tensors) of one format's folder written by write_format_dir, refused unless it holds `family`,
    exactly the key set `expected_keys(architecture, format)` gives, and the sizes of the target's embedding."""
    info = json.loads((folder / "draftkit.json").read_text())
    if info.get("family") != family:
        raise ValueError(f"{folder} holds a {info.get('family')!r} draft, not a {family} drafter")
    arch = info["architecture"]
    tensors = read_tensor_file(folder / "model.safetensors")
    check_keys(tensors, expected_keys(arch, info["format"]), str(folder))
    if list(embed_weight.shape) != [arch["vocab_size"], arch["hidden_size"]]:
        raise ValueError(f"{folder} was trained for a target with vocab {arch['vocab_size']} and hidden size "
                         f"{arch['hidden_size']}; this target's embedding is {list(embed_weight.shape)}. Fix: pass "
                         f"the target it was trained for ({info.get('target')})")
    return info, tensors


def load_feature_drafter(folder: str | os.PathLike, *, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                         head_norm_weight: torch.Tensor | None = None) -> tuple[FeatureDrafter, dict]:
    """Rebuild a drafter from any of the three formats around the target's embedding and LM head.

    Returns (drafter in fp32, eval mode; the folder's draftkit.json). The key set is checked exactly.
    """
    folder = Path(folder)
    info, tensors = read_format_dir(folder, FAMILY, expected_keys, embed_weight)
    arch = info["architecture"]
    if info["target_feature"]["norm"] == "pre_norm" and head_norm_weight is None:
        raise ValueError(f"{folder} reads pre-norm features: pass the target's final norm weight")
    if not arch.get("embedding_trained", False):
        tensors.pop("embed_tokens.weight", None)  # an untrained copy of the target's: the target's own is used
    token_map = _stored_token_map(folder, info, tensors)
    draft = feature_drafter(
        embed_weight=embed_weight, lm_head_weight=lm_head_weight, num_heads=arch["num_attention_heads"],
        num_kv_heads=arch["num_key_value_heads"], intermediate_size=arch["intermediate_size"],
        rope_theta=arch["rope_theta"], rms_norm_eps=arch["rms_norm_eps"], feature_sampling=arch["feature_sampling"],
        partial_alignment=arch["partial_alignment"], fc_bias="fc.bias" in tensors,
        head_norm_weight=head_norm_weight if info["target_feature"]["norm"] == "pre_norm" else None,
        token_map=token_map)
    missing, unexpected = draft.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    trained = {n for n, p in draft.named_parameters() if p.requires_grad}
    if unexpected or trained & set(missing):
        raise ValueError(f"{folder}: missing {sorted(trained & set(missing))}, unexpected {sorted(unexpected)}")
    return draft.to(embed_weight.device).eval(), info


def _stored_token_map(folder: Path, info: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The draft vocabulary a folder was trained with (popped from `tensors`), or None for the full vocabulary."""
    size = info["architecture"].get("draft_vocab_size")
    token_map = tensors.pop("token_map", None)
    if info["format"] == "eagle-sglang" and size is not None:
        path = folder / info.get("token_map", SGLANG_TOKEN_MAP)
        if not path.is_file():
            raise ValueError(f"{folder} holds a draft trained on a {size}-token draft vocabulary but its "
                             f"{path.name} is missing. Fix: export the run again")
        token_map = torch.as_tensor(torch.load(path, weights_only=True), dtype=torch.long)
    if size is not None and (token_map is None or token_map.shape != (size,)):
        raise ValueError(f"{folder}: expected a token_map of {size} ids, found "
                         f"{None if token_map is None else tuple(token_map.shape)}")
    return token_map


def load(directory, target, dtype: torch.dtype = torch.float32) -> LoadedDraft:
    """The drafter in any of the three formats around `target`'s embedding, LM head and final norm, in `dtype`; the
    runtime needs the target feature it was trained on (recorded in draftkit.json)."""
    try:
        module, info = load_feature_drafter(directory, embed_weight=target.embed_tokens.weight,
                                            lm_head_weight=target.lm_head.weight,
                                            head_norm_weight=target.model.get_decoder().norm.weight)
    except ArtifactError:
        raise
    except ValueError as error:  # wrong target or a tampered folder: a user's problem, not a bug
        raise ArtifactError(str(error)) from None
    if module.vocab_size != target.vocab_size:
        raise ArtifactError(f"draft {directory} has vocab_size={module.vocab_size} but target {target.name} has "
                            f"{target.vocab_size}. Fix: pass the --target this draft was trained for")
    return LoadedDraft(module.to(dtype), settings={"feature_norm": info["target_feature"]["norm"],
                                                   "name": str(directory)}, info=info)



# Official EAGLE-1 checkpoints (SafeAILab/EAGLE, eagle/model/cnets.py `Model`; trained by eagle/train/main.py):
# `fc` = Linear(2H, H) with a bias by default, reading cat(embedding of x_{t+1}, feature f_t); one Llama decoder
# layer `layers.0.*` without input_layernorm (EAGLE's layer 0 has none) and without a final norm; `embed_tokens`, the
# target's frozen embedding, in the files main.py's accelerate state writes (state_<n>/model.safetensors) and
# optionally in released `pytorch_model.bin` files. The config is a one-layer Llama config (EConfig): RoPE theta from
# `rope_theta` (default 10000), rms_norm_eps default 1e-6. Features are the target's last hidden state after its
# final norm (the data step stores `hidden_states[-1]`), which is draftkit's post_norm feature.
EAGLE1_LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight")
EAGLE1_CHECKPOINTS = ("pytorch_model.bin", "model.safetensors")


def _eagle1_rope_theta(config: dict, where: str) -> float:
    """The theta cnets.py's LlamaAttention uses for this config; scaled RoPE has no counterpart in draftkit's layer."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ArtifactError(f"{where}: RoPE scaling {scaling} is not supported by draftkit's feature drafter (plain "
                            "RoPE only). Fix: convert a checkpoint trained without rope_scaling")
    return float(config.get("rope_theta", (scaling or {}).get("rope_theta", 10000.0)))


def import_eagle1(source: str | os.PathLike, out_dir: Path, target, *, config_path: str | os.PathLike | None = None,
                  num_speculative_tokens: int = 5) -> dict[str, Path]:
    """An official EAGLE-1 checkpoint -> draftkit's feature-drafter artifact (EAGLE-1 variant, post-norm features) for
    `target`, plus an eagle-sglang folder (its layout keeps the fc bias); returns the folders written.

    `source`: a directory with pytorch_model.bin (a release) or model.safetensors (main.py's state_<n> folder), or
    that file itself; the config is `config_path` or config.json next to the weights (main.py's --configpath)."""
    source = Path(source)
    folder = source.parent if source.is_file() else source
    if source.is_file():
        weights = source
    else:
        weights = next((folder / n for n in EAGLE1_CHECKPOINTS if (folder / n).is_file()), None)
        if weights is None:
            raise ArtifactError(f"{folder} holds neither {' nor '.join(EAGLE1_CHECKPOINTS)}. Fix: pass the EAGLE-1 "
                                "release folder or the state_<n> folder eagle/train/main.py saved")
    config_path = Path(config_path) if config_path is not None else folder / "config.json"
    if not config_path.is_file():
        raise ArtifactError(f"no EAGLE config at {config_path}. Fix: pass --config <the config.json the checkpoint "
                            "was trained with> (eagle/train/main.py's --configpath)")
    config = json.loads(config_path.read_text())
    where = str(weights)
    if config.get("num_hidden_layers", 1) != 1 or config.get("qkv_bias") or config.get("hidden_act", "silu") != "silu":
        raise ArtifactError(f"{config_path}: num_hidden_layers={config.get('num_hidden_layers')}, qkv_bias="
                            f"{config.get('qkv_bias', False)}, hidden_act={config.get('hidden_act', 'silu')}; "
                            "draftkit's EAGLE-1 drafter is one SiLU Llama layer without attention biases. Fix: convert "
                            "an EAGLE-1 checkpoint of that shape")
    tensors = read_tensor_file(weights)
    layer = {f"layers.0.{name}" for name in EAGLE1_LAYER}
    unknown = sorted(set(tensors) - layer - {"fc.weight", "fc.bias", "embed_tokens.weight"})
    missing = sorted((layer | {"fc.weight"}) - set(tensors))
    if missing or unknown:
        hint = (" (midlayer.*/d2t/t2d: an EAGLE-3 checkpoint)" if any(k.startswith(("midlayer.", "d2t", "t2d"))
                                                                     for k in unknown) else "")
        raise ArtifactError(f"{where}: not an EAGLE-1 checkpoint{hint}: missing {missing[:6]}, unknown {unknown[:6]}. "
                            "Fix: pass an EAGLE-1 checkpoint (fc, layers.0 without input_layernorm, embed_tokens)")
    embed = target.embed_tokens.weight
    if "embed_tokens.weight" in tensors:
        require_same_as_target(tensors.pop("embed_tokens.weight"), embed, "embed_tokens", where)
    hidden = tensors["fc.weight"].shape[0]
    if hidden != target.hidden_size or config.get("vocab_size", target.vocab_size) != target.vocab_size:
        raise ArtifactError(f"{where}: hidden size {hidden} and vocabulary {config.get('vocab_size')} differ from "
                            f"target {target.name}'s ({target.hidden_size}, {target.vocab_size}). Fix: pass the model "
                            "the checkpoint was trained on as --target")
    heads = config["num_attention_heads"]
    try:
        draft = feature_drafter(
            embed_weight=embed, lm_head_weight=target.lm_head.weight, num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads, intermediate_size=config["intermediate_size"],
            rope_theta=_eagle1_rope_theta(config, str(config_path)), rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            feature_sampling=False, partial_alignment=False, fc_bias="fc.bias" in tensors)
        check_keys(tensors, {k: list(v.shape) for k, v in trained_tensors(draft).items()}, where)
    except ValueError as error:
        raise ArtifactError(f"{error}. Fix: pass the config.json this checkpoint was trained with") from None
    draft.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    provenance = {"converted_from": {"format": "eagle1", "reference": "SafeAILab/EAGLE eagle/model/cnets.py Model",
                                     "weights": str(weights), "config": str(config_path)}}
    return export_feature_drafter(
        draft, out_dir, target_name=target.name, feature_norm="post_norm", feature_layer=target.num_layers,
        target_vocab_size=target.vocab_size, max_position_embeddings=config.get("max_position_embeddings", 2048),
        num_speculative_tokens=num_speculative_tokens,
        resolved_config_yaml=f"# converted by python -m draftkit.convert eagle1\nsource: {weights}\nconfig: "
                             f"{json.dumps(config)}\n",
        eagle_formats=["eagle-sglang"] if draft.fc.bias is not None else None, extra_info=provenance)
