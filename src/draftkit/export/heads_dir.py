"""draftkit's own format for draft heads no serving runtime loads (Hydra, Hydra++, Clover-2).

A directory holds config.json ({"family", "architecture": the builder's arguments, "target", "hidden_size",
"vocab_size"}), model.safetensors (the module's state dict; a shared target LM head is not stored), manifest.json and
draftkit.json (the same information for `python -m draftkit.eval`). Reading rebuilds the module from the recorded
arguments and requires exactly its key set and shapes. A module with a draft vocabulary (drafts/vocab.py) carries its
int64 `token_map` in the state dict and config.json records `draft_vocab_size`; reading passes that map back to the
builder, so the rebuilt projections have the same rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from draftkit.export.artifact import (
    ArtifactError,
    LoadedDraft,
    cast_tensors,
    check_matches_target,
    load_exact,
    manifest,
    read_json,
    read_tensor_file,
    write_dir,
)
from draftkit.export.card import draftkit_target, model_card, target_load_name

WEIGHTS = "model.safetensors"


def export_heads_dir(module: nn.Module, out_dir: Path, *, family: str, architecture: dict, target_name: str,
                     hidden_size: int, vocab_size: int, dtype: str = "float32", extra_info: dict | None = None,
                     eval_table_md: str = "", target_reference: dict | None = None) -> Path:
    """`architecture`: the JSON-serialisable keyword arguments that rebuild `module` (plus call-time target pieces)."""
    tensors = cast_tensors(module.state_dict(), getattr(torch, dtype))
    token_map = getattr(module, "token_map", None)
    info = {"family": family, "format": "draftkit", "architecture": architecture, "target": target_name,
            "hidden_size": hidden_size, "vocab_size": vocab_size, "dtype": dtype,
            "draft_vocab_size": None if token_map is None else token_map.numel(), **(extra_info or {})}
    params = sum(t.numel() for name, t in tensors.items() if name != "token_map")
    card = model_card(
        title=f"{family} draft heads for {target_load_name(target_name, target_reference)}", tags=[family],
        summary=(f"{family} draft heads for speculative decoding on the target's hidden states, trained with draftkit "
                 f"(recipe `{family}`); {params:,} parameters. No serving engine loads this family: draftkit's "
                 "runtime decodes them with a token tree."),
        target_name=target_name, target_reference=target_reference, eval_table=eval_table_md,
        usage=[("draftkit", "bash", f"python -m draftkit.eval --draft {out_dir} --target "
                                    f"{draftkit_target(target_name, target_reference)}")])
    return write_dir(out_dir, {"config.json": info, WEIGHTS: tensors, "manifest.json": manifest(tensors),
                               "draftkit.json": info, "README.md": card})


def load_heads_dir(directory: str | Path, build: Callable[..., nn.Module], *, family: str,
                   **call_site) -> tuple[nn.Module, dict]:
    """Rebuild with `build(**architecture, **call_site)` (and the stored token_map for a draft vocabulary) and load the
    weights, requiring the exact key set and shapes."""
    directory = Path(directory)
    info = read_json(directory / "draftkit.json")
    if info.get("family") != family:
        raise ArtifactError(f"{directory} holds a {info.get('family')!r} artifact, not {family!r}")
    tensors = read_tensor_file(directory / WEIGHTS)
    size = info.get("draft_vocab_size")
    if size is not None:
        token_map = tensors.get("token_map")
        if token_map is None or token_map.shape != (size,):
            raise ArtifactError(f"{directory}: draft_vocab_size is {size} but model.safetensors holds no token_map of "
                                f"that many ids. Fix: re-export with draftkit")
        call_site = {**call_site, "token_map": token_map.long()}
    try:
        module = build(**info["architecture"], **call_site)
    except ValueError as error:  # e.g. a token_map outside this target's vocabulary
        raise ArtifactError(f"{directory}: {error}") from None
    load_exact(module, tensors, str(directory),
               "the recorded architecture; the artifact was made for another target or edited by hand")
    return module.eval(), info


def load_for_target(directory, target, build: Callable[..., nn.Module], *, family: str, dtype: torch.dtype,
                    **call_site) -> LoadedDraft:
    """load_heads_dir for `target`: refused when the heads read another hidden size or predict another vocabulary;
    the module goes to the target's device in `dtype`."""
    info = read_json(Path(directory) / "draftkit.json")
    check_matches_target(info, hidden_size=info["hidden_size"], vocab_size=info["vocab_size"], target_name=target.name,
                         target_hidden_size=target.hidden_size, target_vocab_size=target.vocab_size,
                         where=str(directory))
    module, info = load_heads_dir(directory, build, family=family, hidden_size=info["hidden_size"],
                                  target_config=target.config, **call_site)
    return LoadedDraft(module.to(device=target.device, dtype=dtype), info=info)

