"""Upload an exported draft artifact (the directory a recipe wrote, model card included) to the Hugging Face Hub.

Everything is checked locally first: the directory holds an artifact (config.json and safetensors weights),
its model card exists and carries the measured acceptance table, and the card front matter names the Hub
metadata. Only then is the network touched (one create_repo, one upload_folder).
"""

from __future__ import annotations

import re
from pathlib import Path

from draftkit.errors import UserError

ARTIFACT_DIR = "export"


class HubExportError(UserError):
    pass


def find_artifact(path: str | Path) -> Path:
    """A run directory (its `export/` is used) or an export directory itself."""
    path = Path(path)
    candidates = [path / ARTIFACT_DIR, path] if (path / ARTIFACT_DIR).is_dir() else [path]
    for candidate in candidates:
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            return candidate
    raise HubExportError(
        f"{path} holds no exported draft (config.json + *.safetensors, directly or in {path / ARTIFACT_DIR}). "
        "Fix: pass a finished run directory, or re-run the training command on it to write the export")


def check_tensors(artifact: Path) -> str:
    """Every tensor of the artifact is readable and is what the artifact says it is: each safetensors file read whole
    (a file cut short is refused by name), checked against the manifest.json next to it, and a draft LM (a folder whose
    config.json names a transformers architecture, without a manifest) loaded and checked tensor by tensor against its
    config. Raises ArtifactError; returns a one-line summary."""
    from draftkit.export.artifact import check_manifest, read_tensor_file
    from draftkit.export.lm import read_draft

    files = sorted(Path(artifact).rglob("*.safetensors"))
    count = 0
    for path in files:
        tensors = read_tensor_file(path)
        check_manifest(path.parent, tensors)
        count += len(tensors)
    for folder in sorted({path.parent for path in files}):
        config = folder / "config.json"
        if not (folder / "manifest.json").is_file() and config.is_file() and "architectures" in config.read_text():
            read_draft(folder)
    return f"{count} tensors in {len(files)} file(s) readable and matching their manifest or config"


def _check_card(artifact: Path) -> str:
    card = artifact / "README.md"
    if not card.is_file():
        raise HubExportError(f"{artifact} has no model card (README.md); the recipe's exporter writes one. Fix: "
                             "re-export the run")
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise HubExportError(f"{card} has no YAML front matter, so the Hub would show no metadata. Fix: re-export the "
                             "run")
    if not re.search(r"^\|.*τ.*\|$", text, flags=re.M) and "(acceptance not measured" not in text:
        raise HubExportError(f"{card} carries no measured τ table. Fix: export after evaluation (eval=quick)")
    return text


def push_to_hub(artifact_dir: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, revision: str | None = None) -> str:
    """Upload the artifact; returns the URL of the commit."""
    from huggingface_hub import HfApi

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise HubExportError(f"repo id {repo_id!r} is not of the form <user or org>/<name>. Fix: e.g. "
                             "--push-to-hub me/smollm2-draft")
    artifact = find_artifact(artifact_dir)
    _check_card(artifact)
    check_tensors(artifact)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(artifact), repo_type="model", revision=revision,
                             commit_message=commit_message or f"Upload draft model from draftkit ({artifact.parent.name})",
                             ignore_patterns=[".*"])
    return str(getattr(info, "commit_url", info))
