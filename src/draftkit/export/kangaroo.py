"""Kangaroo adapter artifact: what the adapter needs to run on top of its target, and nothing of the target itself.

Layout:
  config.json         the adapter's LlamaConfig (the target's text config with num_hidden_layers = 1)
  model.safetensors   norm.weight, layers.0.input_layernorm.weight, layers.0.self_attn.{q,k,v,o}_proj.weight
                      (the reference implementation's names; it loads them with strict=False, draftkit checks them)
  draftkit.json       {"family": "kangaroo", target, target_num_layers, target_hidden_size, target_vocab_size,
                       exit_layer, threshold, max_draft_tokens, tensors: {name: shape}}
  README.md           model card with the measured acceptance table
No serving runtime (vLLM, SGLang, TRT-LLM) loads Kangaroo adapters; `python -m draftkit.eval --draft <dir>` runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from draftkit.drafts.kangaroo import KangarooAdapter
from draftkit.export.artifact import ArtifactError, LoadedDraft, read_tensor_file
from draftkit.export.card import draftkit_target, model_card, target_load_name
from draftkit.io import staged_directory

FAMILY = "kangaroo"
FORMAT_VERSION = 1

def expected_keys(adapter: KangarooAdapter) -> dict[str, list[int]]:
    return {name: list(tensor.shape) for name, tensor in adapter.state_dict().items()}


def export_kangaroo(
    adapter: KangarooAdapter, out_dir: Path, *, target_name: str, target_num_layers: int, target_vocab_size: int,
    exit_layer: int, threshold: float, max_draft_tokens: int, eval_table_md: str = "",
    target_reference: dict | None = None,
) -> Path:
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.state_dict().items()}
        adapter.config.to_json_file(staging / "config.json")
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        meta = {
            "family": FAMILY, "format_version": FORMAT_VERSION, "target": target_name,
            "target_num_layers": target_num_layers, "target_hidden_size": adapter.config.hidden_size,
            "target_vocab_size": target_vocab_size, "exit_layer": exit_layer, "threshold": threshold,
            "max_draft_tokens": max_draft_tokens, "tensors": expected_keys(adapter),
        }
        (staging / "draftkit.json").write_text(json.dumps(meta, indent=2) + "\n")
        params = sum(t.numel() for t in tensors.values())
        (staging / "README.md").write_text(model_card(
            title=f"Kangaroo adapter for {target_load_name(target_name, target_reference)}", tags=[FAMILY],
            summary=(f"Self-speculative decoding: the target's first {exit_layer} of {target_num_layers} layers plus "
                     f"this adapter (one attention-only decoder layer and a norm, {params:,} parameters) draft through "
                     f"the target's own LM head; drafting stops early when the draft's top-1 probability falls below "
                     f"{threshold}, and verification runs only layers {exit_layer}..{target_num_layers - 1} on the "
                     "cached early-exit states. Trained with draftkit (recipe `kangaroo`). No serving engine loads "
                     "Kangaroo adapters: draftkit's runtime runs them."),
            target_name=target_name, target_reference=target_reference, eval_table=eval_table_md,
            usage=[("draftkit", "bash", f"python -m draftkit.eval --draft {out_dir} --target "
                                        f"{draftkit_target(target_name, target_reference)} --gamma {max_draft_tokens}")]))
    return out_dir


def load_kangaroo(path: Path, target_shape: tuple[int, int] | None = None) -> tuple[KangarooAdapter, dict]:
    """The adapter (fp32, eval mode) and its draftkit.json; any missing, unexpected or misshapen tensor is an error.
    `target_shape` = (num_layers, vocab_size) of the target it will run on, checked against the one it was trained for."""
    path = Path(path)
    meta_file = path / "draftkit.json"
    if not meta_file.is_file():
        raise ArtifactError(f"{path} has no draftkit.json; it is not a draftkit Kangaroo export. Fix: pass the export/ "
                            "directory of a kangaroo run")
    meta = json.loads(meta_file.read_text())
    if meta.get("family") != FAMILY:
        raise ArtifactError(f"{path} holds a {meta.get('family')!r} artifact, not a Kangaroo adapter. Fix: load it "
                            "with its own family's loader")
    trained_for = (meta["target_num_layers"], meta["target_vocab_size"])
    if target_shape is not None and tuple(target_shape) != trained_for:
        raise ArtifactError(
            f"the Kangaroo adapter in {path} was trained for {meta['target']} ({trained_for[0]} layers, vocabulary "
            f"{trained_for[1]}), not for a target with {target_shape[0]} layers and vocabulary {target_shape[1]}. "
            "Fix: pass that target (--target), or train an adapter for this one"
        )
    adapter = KangarooAdapter(LlamaConfig.from_json_file(path / "config.json"))
    adapter.config._attn_implementation = "sdpa"
    expected = expected_keys(adapter)
    tensors = read_tensor_file(path / "model.safetensors")
    found = {k: list(v.shape) for k, v in tensors.items()}
    if found != expected or meta.get("tensors") != expected:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        misshapen = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        raise ArtifactError(
            f"{path}/model.safetensors does not match a Kangaroo adapter for its config.json: missing {missing}, "
            f"unexpected {unexpected}, wrong shape {misshapen}"
            + ("" if meta.get("tensors") == expected else "; the draftkit.json manifest disagrees too")
            + ". Fix: re-export the adapter with draftkit"
        )
    adapter.load_state_dict(tensors, strict=True)
    return adapter.float().eval(), meta


def load(directory, target, dtype: torch.dtype = torch.float32) -> LoadedDraft:
    """The adapter for `target` (checked against the depth and vocabulary it was trained for), in `dtype`; the runtime
    needs the recorded exit layer and early-exit threshold."""
    adapter, meta = load_kangaroo(directory, target_shape=(target.num_layers, target.vocab_size))
    return LoadedDraft(adapter.to(device=target.device, dtype=dtype),
                       settings={"exit_layer": meta["exit_layer"], "threshold": meta["threshold"]}, info=meta)

