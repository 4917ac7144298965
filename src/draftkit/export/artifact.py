"""What every draftkit artifact directory shares: atomic writes, a key/shape manifest, exact key-set checks, the check
that an artifact fits the target it is about to run with, and what a family's `load` returns.

Each method `<m>` owns `draftkit.export.<m>`, which writes its artifacts and reads them back with

    load(directory, target, dtype=torch.float32) -> LoadedDraft

`draftkit.eval` finds that module from the `family` an artifact's draftkit.json records (a directory without one is a
plain HF draft LM: family "lm"), then hands the result to `draftkit.runtime.<m>.drafting` (runtime/drafting.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from draftkit.errors import UserError
from draftkit.io import staged_directory


class ArtifactError(UserError):
    pass


PLAIN_HF_FAMILY = "lm"


@dataclass
class LoadedDraft:
    """A family's trained module(s) on the target's device, the keyword arguments its runtime's `drafting` needs (what
    the artifact records for decoding), and the artifact's draftkit.json (empty for a plain HF draft)."""

    module: Any
    settings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def artifact_family(directory) -> str:
    """The family an artifact directory holds: draftkit.json's "family", or "lm" for a plain HF draft directory."""
    info = Path(directory) / "draftkit.json"
    family = json.loads(info.read_text()).get("family") if info.is_file() else None
    return family or PLAIN_HF_FAMILY


def check_key_set(found, expected: set[str], where: str) -> None:
    """Unknown or missing tensor names are an error: loaders that drop them silently leave modules at their init."""
    found = set(found)
    missing, unknown = sorted(expected - found), sorted(found - expected)
    if missing or unknown:
        raise ArtifactError(f"{where}: tensor names do not match the format: missing {missing[:6]}, unknown "
                            f"{unknown[:6]}. Fix: re-export with draftkit, or convert the names to the format's")


def load_exact(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str, shape_hint: str) -> None:
    """Load `tensors` into `module` only if the names are exactly its own and every shape matches (`shape_hint` says
    what a shape mismatch means for this artifact)."""
    expected = module.state_dict()
    check_key_set(tensors, set(expected), where)
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in tensors.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ArtifactError(f"{where}: tensor shapes differ from {shape_hint} ({wrong[:4]})")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def check_manifest(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The tensors of `directory` against its manifest.json (names, shapes, dtypes), when it has one."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())
    check_key_set(tensors, set(recorded), str(directory))
    wrong = [f"{k}: {list(t.shape)} {str(t.dtype).removeprefix('torch.')} vs {recorded[k]['shape']} "
             f"{recorded[k]['dtype']}" for k, t in tensors.items()
             if list(t.shape) != recorded[k]["shape"] or str(t.dtype).removeprefix("torch.") != recorded[k]["dtype"]]
    if wrong:
        raise ArtifactError(f"{directory}: tensors differ from manifest.json ({wrong[:4]}). Fix: export the draft again")


def manifest(tensors: dict[str, torch.Tensor]) -> dict:
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in sorted(tensors.items())}


def cast_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors in `dtype`; integer ones (a draft vocabulary's token_map) keep theirs, ids are not weights."""
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in tensors.items()}


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ArtifactError(f"{path.parent}: no {path.name}; not a draftkit export directory")
    return json.loads(path.read_text())


def write_dir(out_dir: Path, files: dict[str, object]) -> Path:
    """Write every file (.safetensors / .pt: tensors; a str: text, e.g. the model card; else JSON) into a staging
    directory, then swap it in."""
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        for name, payload in files.items():
            path = staging / name
            if name.endswith(".safetensors"):
                save_file(payload, str(path))
            elif name.endswith(".pt"):
                torch.save(payload, path)
            elif isinstance(payload, str):
                path.write_text(payload)
            else:
                path.write_text(json.dumps(payload, indent=2) + "\n")
    return out_dir


def check_matches_target(artifact_info: dict, *, hidden_size: int, vocab_size: int, target_name: str,
                         target_hidden_size: int, target_vocab_size: int, where: str) -> None:
    """Refuse heads trained for another target: hidden size and vocabulary must equal the target's."""
    if hidden_size != target_hidden_size or vocab_size != target_vocab_size:
        trained_for = artifact_info.get("target", "another target")
        raise ArtifactError(
            f"{where}: these heads read hidden states of size {hidden_size} and predict {vocab_size} tokens, but "
            f"target {target_name} has hidden_size={target_hidden_size} and vocab_size={target_vocab_size}. The heads "
            f"were trained for {trained_for}. Fix: pass that model as --target, or train heads for this target")


# Reading checkpoints written by other projects' trainers (`python -m draftkit.convert`). Each family's converter in
# draftkit.export.<m> knows its reference's names; these read the files and check what every converter checks.

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file or a torch pickle of tensors (read with weights_only: a pickle cannot run code here);
    ArtifactError naming the file when it is missing, cut short or damaged."""
    from safetensors.torch import load_file

    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing. Fix: export the draft again, or copy the whole export directory")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:  # safetensors checks that its header covers the file exactly
            raise ArtifactError(f"{path} cannot be read ({error}): the file is cut short or damaged. Fix: export "
                                "the draft again, or copy the file again") from None
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle of anything but tensors, or not a pickle at all
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ArtifactError(f"{path} is not a state dict of tensors ({type(error).__name__}: {first_line}). Fix: pass the "
                            "file the trainer wrote (a safetensors file or a torch.save of a state dict)") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ArtifactError(f"{path} holds a {type(tensors).__name__}, not a state dict of tensors. Fix: pass the file "
                            "the trainer wrote (a torch.save of a state dict)")
    return tensors


def read_model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF-style model directory: one weights file, or the shards its index lists."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return read_tensor_file(path)
        tensors = {}
        for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
            tensors.update(read_tensor_file(directory / shard))
        return tensors
    raise ArtifactError(f"{directory} holds no weights ({', '.join(WEIGHT_FILES)}). Fix: pass the checkpoint directory "
                        "the trainer wrote")


def require_same_as_target(stored: torch.Tensor, target_weight: torch.Tensor, what: str, where: str) -> None:
    """A target tensor a reference checkpoint carries (its frozen embedding, say) must be the target's own, compared at
    the checkpoint's precision: heads trained on another target's embedding would draft wrong tokens silently."""
    if tuple(stored.shape) != tuple(target_weight.shape) or not torch.equal(
            stored.detach().cpu(), target_weight.detach().cpu().to(stored.dtype)):
        raise ArtifactError(f"{where}: its {what} {tuple(stored.shape)} is not this target's {what} "
                            f"{tuple(target_weight.shape)}; the checkpoint was trained on another model. Fix: pass "
                            "the model it was trained on as --target")
