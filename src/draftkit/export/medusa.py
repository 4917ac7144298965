"""Medusa heads as artifacts: vLLM's format (vllm/model_executor/models/medusa.py) and FasterDecoding's original
format (medusa/model/medusa_model.py).

Both directories hold config.json, the weights as safetensors, manifest.json (every tensor's name, shape and dtype) and
draftkit.json (family "medusa", the format, the target's name, hidden size and vocabulary, the heads' settings), which
`python -m draftkit.eval` reads. `load_medusa` reads either format back and checks the exact key set: a missing or
unknown tensor is an error, never a silent partial load (vLLM and FasterDecoding loaders drop unknown names).

vLLM: `blocks.{h}.layers.{l}.weight|bias`, `lm_heads.{h}.weight`; with the target's LM head shared,
`original_lm_head: true` and one `lm_heads.0.weight` holding a copy of it. Heads with a draft vocabulary
(drafts/vocab.py) have V' = `truncated_vocab_size` rows in every lm_heads tensor (the shared copy too) and the int64
`token_map` [V']. vLLM's MedusaConfig renames EVERY config key containing "num" and "heads" to num_heads, and "num"
and "layers" to num_hidden_layers, so the config holds no other such key (`check_vllm_config`).
FasterDecoding: `{h}.{l}.linear.weight|bias` and, with per-head projections ("version 1"), `{h}.{L}.weight`, in
medusa_lm_head.safetensors (what train_legacy.py writes) and medusa_lm_head.pt (what its loaders read). Its ResBlocks
always have a bias, and it has no truncated vocabulary. Its loader repeats one ResBlock per head (`[ResBlock] * L`),
so heads with num_layers > 1 load there with their layers tied; draftkit's loader keeps them apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from draftkit.drafts.medusa import MedusaHeads
from draftkit.export.artifact import (
    ArtifactError,
    LoadedDraft,
    cast_tensors,
    check_key_set,
    check_matches_target,
    manifest,
    read_json,
    read_model_weights,
    read_tensor_file,
    require_same_as_target,
    write_dir,
)
from draftkit.export.card import draftkit_target, model_card, target_load_name

FAMILY = "medusa"
FORMATS = ("vllm", "fasterdecoding")
VLLM_WEIGHTS = "model.safetensors"
FD_WEIGHTS = "medusa_lm_head.safetensors"
FD_PICKLE = "medusa_lm_head.pt"


@dataclass
class MedusaArtifact:
    heads: MedusaHeads
    shared_lm_head: torch.Tensor | None
    """the target LM head stored with the heads (vLLM original_lm_head), or None: use the target's own"""
    info: dict


def vllm_keys(num_heads: int, num_layers: int, bias: bool, original_lm_head: bool, truncated: bool = False) -> set[str]:
    keys = {f"blocks.{h}.layers.{l}.weight" for h in range(num_heads) for l in range(num_layers)}
    if truncated:
        keys.add("token_map")
    if bias:
        keys |= {f"blocks.{h}.layers.{l}.bias" for h in range(num_heads) for l in range(num_layers)}
    keys |= {"lm_heads.0.weight"} if original_lm_head else {f"lm_heads.{h}.weight" for h in range(num_heads)}
    return keys


def fasterdecoding_keys(num_heads: int, num_layers: int, own_lm_head: bool) -> set[str]:
    keys = {f"{h}.{l}.linear.{p}" for h in range(num_heads) for l in range(num_layers) for p in ("weight", "bias")}
    if own_lm_head:
        keys |= {f"{h}.{num_layers}.weight" for h in range(num_heads)}
    return keys


def check_vllm_config(config: dict) -> None:
    """vLLM renames any key with "num" and "heads" (or "layers") onto num_heads (num_hidden_layers): allow no other."""
    for key in config:
        lowered = key.lower()
        if "num" in lowered and "heads" in lowered and key != "num_heads":
            raise ArtifactError(f"vLLM Medusa config key {key!r} would be renamed to num_heads by vLLM; remove it")
        if "num" in lowered and "layers" in lowered and key != "num_hidden_layers":
            raise ArtifactError(f"vLLM Medusa config key {key!r} would be renamed to num_hidden_layers by vLLM; remove it")


def _info(heads: MedusaHeads, fmt: str, target_name: str, extra: dict | None) -> dict:
    return {
        "family": FAMILY, "format": fmt, "target": target_name, "hidden_size": heads.hidden_size,
        "vocab_size": heads.vocab_size, "num_heads": heads.num_heads, "num_layers": heads.num_layers,
        "bias": heads.bias, "lm_head": heads.lm_head_mode, "draft_vocab_size": _truncated_size(heads), **(extra or {}),
    }


def _truncated_size(heads: MedusaHeads) -> int | None:
    """V' when the heads score fewer tokens than the target has; a token_map of the whole vocabulary is the identity,
    and vLLM only reads token_map when truncated_vocab_size < vocab_size, so that is exported as no truncation."""
    return heads.draft_vocab_size if heads.draft_vocab_size < heads.vocab_size else None


def _card(heads: MedusaHeads, fmt: str, out_dir: Path, target_name: str, target_reference: dict | None,
          eval_table: str, extra_info: dict | None) -> str:
    load = target_load_name(target_name, target_reference)
    if fmt == "vllm":
        serve = [("vLLM (decodes a chain: the top-1 token of each head)", "bash",
                  f"vllm serve {load} --speculative-config '{{\"method\": \"medusa\", \"model\": \"{out_dir}\", "
                  f"\"num_speculative_tokens\": {heads.num_heads}}}'")]
    else:
        serve = [("FasterDecoding/Medusa (config.json names the target as base_model_name_or_path)", "bash",
                  f"python -m medusa.inference.cli --model {out_dir}")]
    joint = (extra_info or {}).get("target_lora")
    return model_card(
        title=f"Medusa heads for {load} ({fmt} format)", tags=["medusa", f"medusa-{fmt}"],
        summary=(f"{heads.num_heads} Medusa heads ({heads.num_layers} residual layer(s) each) on the target's final "
                 f"hidden state, trained with draftkit (recipe `medusa`); head k predicts the token k + 2 positions "
                 "ahead." + (" Medusa-2: the heads read the target with the LoRA adapters of `../target_lora` merged "
                             "into it, so serve that merged model as the target." if joint else "")),
        target_name=target_name, target_reference=target_reference, eval_table=eval_table,
        usage=[*serve, ("draftkit (chain or tree decoding)", "bash",
                        f"python -m draftkit.eval --draft {out_dir} --target "
                        f"{draftkit_target(target_name, target_reference)}")])


def export_medusa_vllm(heads: MedusaHeads, out_dir: Path, *, target_name: str, target_lm_head: torch.Tensor,
                       dtype: str = "bfloat16", extra_info: dict | None = None, eval_table_md: str = "",
                       target_reference: dict | None = None) -> Path:
    """vLLM Medusa directory. `target_lm_head` [V', H] (the rows the heads score: the target's LM head, or its token_map
    rows) is stored as lm_heads.0.weight when the heads share it."""
    original_lm_head = heads.lm_heads is None
    truncated = _truncated_size(heads)
    tensors = {k: v for k, v in heads.state_dict().items()}
    if truncated is None:
        tensors.pop("token_map", None)
    if original_lm_head:
        if target_lm_head.shape[0] != heads.draft_vocab_size:
            raise ArtifactError(f"the shared LM head has {target_lm_head.shape[0]} rows but the heads score "
                                f"{heads.draft_vocab_size} tokens. Fix: pass its token_map rows "
                                "(drafts.vocab.draft_rows)")
        tensors["lm_heads.0.weight"] = target_lm_head
    tensors = cast_tensors(tensors, getattr(torch, dtype))
    check_key_set(tensors, vllm_keys(heads.num_heads, heads.num_layers, heads.bias, original_lm_head,
                                     truncated is not None), "vLLM export")
    config = {
        "model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": heads.hidden_size,
        "vocab_size": heads.vocab_size, "num_heads": heads.num_heads, "num_hidden_layers": heads.num_layers,
        "truncated_vocab_size": truncated, "original_lm_head": original_lm_head, "medusa_fc_bias": heads.bias,
        "torch_dtype": dtype,
    }
    check_vllm_config(config)
    return write_dir(out_dir, {"config.json": config, VLLM_WEIGHTS: tensors, "manifest.json": manifest(tensors),
                               "draftkit.json": _info(heads, "vllm", target_name, extra_info),
                               "README.md": _card(heads, "vllm", Path(out_dir), target_name, target_reference,
                                                  eval_table_md, extra_info)})


def export_medusa_fasterdecoding(heads: MedusaHeads, out_dir: Path, *, target_name: str, dtype: str = "float32",
                                 extra_info: dict | None = None, eval_table_md: str = "",
                                 target_reference: dict | None = None) -> Path:
    """FasterDecoding directory: config.json + medusa_lm_head.{safetensors,pt} with the legacy tensor names."""
    if not heads.bias:
        raise ArtifactError("FasterDecoding's ResBlock always has a bias; these heads were built with bias=false. "
                            "Fix: export the vllm format (medusa_fc_bias=false), or train with bias=true")
    if _truncated_size(heads) is not None:
        raise ArtifactError(f"the FasterDecoding format has no truncated vocabulary; these heads score "
                            f"{heads.draft_vocab_size} of {heads.vocab_size} tokens. Fix: medusa.export.formats=[vllm] "
                            "(truncated_vocab_size and token_map), or train with medusa.draft_vocab_size=null")
    L = heads.num_layers
    tensors = {}
    for h, block in enumerate(heads.blocks):
        for l, layer in enumerate(block.layers):
            tensors[f"{h}.{l}.linear.weight"] = layer.weight
            tensors[f"{h}.{l}.linear.bias"] = layer.bias
        if heads.lm_heads is not None:
            tensors[f"{h}.{L}.weight"] = heads.lm_heads[h].weight
    tensors = cast_tensors(tensors, getattr(torch, dtype))
    check_key_set(tensors, fasterdecoding_keys(heads.num_heads, L, heads.lm_heads is not None), "FasterDecoding export")
    # FasterDecoding's MedusaModel loads the base model from this name, so it is the target as transformers loads it.
    config = {"medusa_num_heads": heads.num_heads, "medusa_num_layers": L,
              "base_model_name_or_path": (target_reference or {}).get("load") or target_name,
              "version": "1" if heads.lm_heads is not None else "2"}
    return write_dir(out_dir, {"config.json": config, FD_WEIGHTS: tensors, FD_PICKLE: tensors,
                               "manifest.json": manifest(tensors),
                               "draftkit.json": _info(heads, "fasterdecoding", target_name, extra_info),
                               "README.md": _card(heads, "fasterdecoding", Path(out_dir), target_name,
                                                  target_reference, eval_table_md, extra_info)})


def _load_vllm(directory: Path, config: dict) -> tuple[MedusaHeads, torch.Tensor | None]:
    check_vllm_config(config)
    tensors = read_tensor_file(directory / VLLM_WEIGHTS)
    K, L, bias = config["num_heads"], config["num_hidden_layers"], config.get("medusa_fc_bias", True)
    original = bool(config.get("original_lm_head", False))
    truncated = config.get("truncated_vocab_size") not in (None, config["vocab_size"])
    check_key_set(tensors, vllm_keys(K, L, bias, original, truncated), str(directory))
    token_map = tensors["token_map"].long() if truncated else None
    if truncated and token_map.numel() != config["truncated_vocab_size"]:
        raise ArtifactError(f"{directory}: token_map holds {token_map.numel()} ids but truncated_vocab_size is "
                            f"{config['truncated_vocab_size']}. Fix: re-export with draftkit")
    try:
        heads = MedusaHeads(config["hidden_size"], config["vocab_size"], K, L, lm_head="shared" if original else "own",
                            bias=bias, token_map=token_map)
    except ValueError as error:  # a token_map that is not ascending ids of the vocabulary
        raise ArtifactError(f"{directory}: {error}") from None
    state = {k: v if k == "token_map" else v.float() for k, v in tensors.items()
             if not (original and k == "lm_heads.0.weight")}
    heads.load_state_dict(state, strict=True)
    return heads, tensors["lm_heads.0.weight"].float() if original else None


def _load_fasterdecoding(directory: Path, config: dict, info: dict | None) -> tuple[MedusaHeads, None]:
    path = directory / FD_WEIGHTS
    tensors = read_tensor_file(path) if path.is_file() else torch.load(directory / FD_PICKLE, map_location="cpu",
                                                                     weights_only=True)
    return _fasterdecoding_heads(tensors, config["medusa_num_heads"], config["medusa_num_layers"],
                                 (info or {}).get("vocab_size"), str(directory)), None


def _fasterdecoding_heads(tensors: dict[str, torch.Tensor], K: int, L: int, shared_vocab: int | None,
                          where: str) -> MedusaHeads:
    """MedusaHeads from FasterDecoding's head names (`{h}.{l}.linear.*`, and `{h}.{L}.weight` for own LM heads)."""
    own = any(k == f"0.{L}.weight" for k in tensors)
    check_key_set(tensors, fasterdecoding_keys(K, L, own), where)
    hidden = tensors["0.0.linear.weight"].shape[0]
    vocab = tensors[f"0.{L}.weight"].shape[0] if own else shared_vocab
    if vocab is None:
        raise ArtifactError(f"{where}: version-2 FasterDecoding heads share the target's LM head and do not record "
                            "the vocabulary; pass the target's vocab_size (draftkit.json is missing)")
    heads = MedusaHeads(hidden, vocab, K, L, lm_head="own" if own else "shared", bias=True)
    state = {}
    for h in range(K):
        for l in range(L):
            state[f"blocks.{h}.layers.{l}.weight"] = tensors[f"{h}.{l}.linear.weight"].float()
            state[f"blocks.{h}.layers.{l}.bias"] = tensors[f"{h}.{l}.linear.bias"].float()
        if own:
            state[f"lm_heads.{h}.weight"] = tensors[f"{h}.{L}.weight"].float()
    heads.load_state_dict(state, strict=True)
    return heads


def load_medusa(directory: str | Path, *, vocab_size: int | None = None) -> MedusaArtifact:
    """Read a vLLM or FasterDecoding Medusa directory (told apart by its config.json) with exact key checks."""
    directory = Path(directory)
    config = read_json(directory / "config.json")
    info_path = directory / "draftkit.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    if config.get("model_type") == "medusa":
        heads, shared = _load_vllm(directory, config)
        fmt = "vllm"
    elif "medusa_num_heads" in config:
        if info is None and vocab_size is not None:
            info = {"vocab_size": vocab_size}
        heads, shared = _load_fasterdecoding(directory, config, info)
        fmt = "fasterdecoding"
    else:
        raise ArtifactError(f"{directory}/config.json is neither vLLM Medusa (model_type 'medusa') nor FasterDecoding "
                            "Medusa (medusa_num_heads)")
    info = {**(info or {}), "format": fmt, "family": FAMILY}
    return MedusaArtifact(heads=heads.eval(), shared_lm_head=shared, info=info)


def load(directory, target, dtype: torch.dtype = torch.float32) -> LoadedDraft:
    """The heads in either format, checked against `target`, on its device in `dtype`. Medusa-2 heads read the states
    of the target they were trained with: their LoRA adapters (exported next to them) are merged into `target` here."""
    artifact = load_medusa(directory, vocab_size=target.vocab_size)
    check_matches_target(artifact.info, hidden_size=artifact.heads.hidden_size, vocab_size=artifact.heads.vocab_size,
                         target_name=target.name, target_hidden_size=target.hidden_size,
                         target_vocab_size=target.vocab_size, where=str(directory))
    lora = artifact.info.get("target_lora")
    if lora:
        from peft import PeftModel

        target.model = PeftModel.from_pretrained(target.model, str(Path(directory) / lora)).merge_and_unload()
        target.model.requires_grad_(False).eval()
    # A stored copy of the target's LM head (vLLM original_lm_head) may be bf16-rounded: the runtime scores with the
    # target's own.
    return LoadedDraft(artifact.heads.to(device=target.device, dtype=dtype), info=artifact.info)



# FasterDecoding/Medusa checkpoints, by the loader that reads them (medusa/model/):
#   head file (medusa_model_legacy.py MedusaModel, and medusa_model.py's fallback): config.json {medusa_num_heads,
#     medusa_num_layers, base_model_name_or_path[, version]} and the `medusa_head` ModuleList's state dict,
#     `{h}.{l}.linear.weight|bias` for the residual blocks, plus `{h}.{L}.weight` when each head has its own vocabulary
#     projection (medusa_model.py's layout; the legacy model reads the base LM head instead). medusa_lm_head.pt is what
#     the loaders read, medusa_lm_head.safetensors what train/train_legacy.py writes.
#   full model (medusa_model.py MedusaModelABC and medusa_model_new.py, the Medusa-2 releases): an HF model directory
#     whose config.json is the base model's plus medusa_num_heads/medusa_num_layers and whose weights hold the base
#     model next to `medusa_head.{h}.{l}.linear.*` and `medusa_head.{h}.{L}.weight`.
# Heads read the base model's last hidden state after its final norm, draftkit's Medusa input. The reference repeats one
# ResBlock per head ([ResBlock] * L), so every layer of a head carries the same tensors; draftkit loads them as they are.


def import_fasterdecoding(source: str | Path, out_dir: Path, target) -> Path:
    """A FasterDecoding Medusa checkpoint (either layout) -> draftkit's FasterDecoding-format artifact for `target`."""
    source = Path(source)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise ArtifactError(f"{source}: no config.json. Fix: pass the folder the Medusa trainer wrote (config.json with "
                            "medusa_num_heads and medusa_lm_head.pt/.safetensors, or a full Medusa model folder)")
    config = json.loads(config_path.read_text())
    if "medusa_num_heads" not in config or "medusa_num_layers" not in config:
        raise ArtifactError(f"{config_path} has no medusa_num_heads/medusa_num_layers. Fix: pass a FasterDecoding "
                            "Medusa folder")
    K, L = config["medusa_num_heads"], config["medusa_num_layers"]
    head_file = next((source / n for n in (FD_WEIGHTS, FD_PICKLE) if (source / n).is_file()), None)
    if head_file is not None:
        layout, where, tensors = "head file", str(head_file), read_tensor_file(head_file)
    else:
        layout, where, weights = "full model", str(source), read_model_weights(source)
        tensors = {k.removeprefix("medusa_head."): v for k, v in weights.items() if k.startswith("medusa_head.")}
        _require_target_backbone(weights, target, where)
    heads_in_file = {k.split(".")[0] for k in tensors}
    if len(heads_in_file) != K:
        raise ArtifactError(f"{where} holds {len(heads_in_file)} heads but config.json says medusa_num_heads={K} "
                            "(FasterDecoding's loaders disagree on which wins). Fix: set medusa_num_heads in "
                            "config.json to the number of heads you mean to run")
    heads = _fasterdecoding_heads(tensors, K, L, target.vocab_size, where)
    check_matches_target({"target": config.get("base_model_name_or_path")}, hidden_size=heads.hidden_size,
                         vocab_size=heads.vocab_size, target_name=target.name, target_hidden_size=target.hidden_size,
                         target_vocab_size=target.vocab_size, where=where)
    provenance = {"converted_from": {"format": "fasterdecoding", "layout": layout, "source": str(source),
                                     "version": config.get("version")}}
    return export_medusa_fasterdecoding(heads.eval(), out_dir, target_name=target.name, extra_info=provenance)


def _require_target_backbone(weights: dict[str, torch.Tensor], target, where: str) -> None:
    """A full Medusa model carries its base model: heads trained with a fine-tuned one (Medusa-2) read other states."""
    own = target.model.state_dict()
    for name, tensor in weights.items():
        if name.startswith("medusa_head."):
            continue
        if name not in own:
            raise ArtifactError(f"{where}: base-model tensor {name} is not in target {target.name}. Fix: pass the "
                                "checkpoint's base model as --target (for a Medusa-2 model: the checkpoint folder)")
        try:
            require_same_as_target(tensor, own[name], name, where)
        except ArtifactError:
            raise ArtifactError(f"{where}: its base model differs from target {target.name} at {name} (Medusa-2 "
                                "trains the base model with the heads). Fix: pass the checkpoint folder itself as "
                                "--target, so the heads run on the base model they were trained with") from None
