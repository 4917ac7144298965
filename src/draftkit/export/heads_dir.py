"""draftkit's own format for draft heads no serving runtime loads (Hydra, Hydra++, Clover-2).

A directory holds config.json ({"family", "architecture": the builder's arguments, "target", "hidden_size",
"vocab_size"}), model.safetensors (the module's state dict; a shared target LM head is not stored), manifest.json and
draftkit.json (the same information for `python -m draftkit.eval`). Reading rebuilds the module from the recorded
arguments and requires exactly its key set and shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from draftkit.export.artifact import ArtifactError, cast_tensors, load_exact, manifest, read_json, write_dir

WEIGHTS = "model.safetensors"


def export_heads_dir(module: nn.Module, out_dir: Path, *, family: str, architecture: dict, target_name: str,
                     hidden_size: int, vocab_size: int, dtype: str = "float32", extra_info: dict | None = None) -> Path:
    """`architecture`: the JSON-serialisable keyword arguments that rebuild `module` (plus call-time target pieces)."""
    tensors = cast_tensors(module.state_dict(), getattr(torch, dtype))
    info = {"family": family, "format": "draftkit", "architecture": architecture, "target": target_name,
            "hidden_size": hidden_size, "vocab_size": vocab_size, "dtype": dtype, **(extra_info or {})}
    return write_dir(out_dir, {"config.json": info, WEIGHTS: tensors, "manifest.json": manifest(tensors),
                               "draftkit.json": info})


def load_heads_dir(directory: str | Path, build: Callable[..., nn.Module], *, family: str,
                   **call_site) -> tuple[nn.Module, dict]:
    """Rebuild with `build(**architecture, **call_site)` and load the weights, requiring the exact key set and shapes."""
    directory = Path(directory)
    info = read_json(directory / "draftkit.json")
    if info.get("family") != family:
        raise ArtifactError(f"{directory} holds a {info.get('family')!r} artifact, not {family!r}")
    module = build(**info["architecture"], **call_site)
    load_exact(module, load_file(str(directory / WEIGHTS)), str(directory),
               "the recorded architecture; the artifact was made for another target or edited by hand")
    return module.eval(), info
