"""Check an exported draft artifact (a folder a recipe wrote, model card included) and upload it to the Hugging Face Hub.

Every family's export is pushable: an artifact is a folder with config.json, safetensors weights and a model card
(README.md). Some recipes write several formats side by side (Medusa: `vllm/` and `fasterdecoding/`; FSPAD/EAGLE-1:
draftkit's format with `eagle-vllm/` and `eagle-sglang/` inside it); each is its own artifact, pushed to its own
repository, because a serving engine loads a repository's root. Everything is checked locally first: the folder holds
an artifact, its card exists, has front matter and carries the measured acceptance table, every tensor is readable and
what the artifact says it is, and the repo id is valid. Only then is the network touched (one create_repo, one
upload_folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from draftkit.errors import UserError

ARTIFACT_DIR = "export"
CARD = "README.md"


class HubExportError(UserError):
    pass


def is_artifact(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and (folder / CARD).is_file()


def _format_name(folder: Path, root: Path) -> str:
    if folder != root:
        return folder.name
    info = folder / "draftkit.json"
    return (json.loads(info.read_text()).get("format") if info.is_file() else None) or "hf"


def find_artifacts(path: str | Path) -> dict[str, Path]:
    """{format: folder} for a run directory (its `export/`) or an export folder: the folder itself when it is an
    artifact, and each subfolder that is one."""
    path = Path(path)
    if not path.exists():
        raise HubExportError(f"{path} does not exist. Fix: pass a finished run directory or its export/ directory")
    root = path / ARTIFACT_DIR if (path / ARTIFACT_DIR).is_dir() else path
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return {_format_name(f, root): f for f in folders if is_artifact(f)}


def find_artifact(path: str | Path, fmt: str | None = None) -> Path:
    """The one artifact to upload: the only one there, or the one named by `fmt` (a format or subfolder name)."""
    found = find_artifacts(path)
    if not found:
        raise HubExportError(
            f"{path} holds no exported draft (a folder with config.json, *.safetensors and a model card {CARD}, "
            f"directly or in {Path(path) / ARTIFACT_DIR}). Fix: pass a finished run directory, or re-run the training "
            "command on it to write the export")
    if fmt is not None:
        if fmt not in found:
            raise HubExportError(f"{path} has no {fmt!r} export; it holds {sorted(found)}. Fix: --format one of those")
        return found[fmt]
    if len(found) > 1:
        listed = ", ".join(f"{name} ({folder})" for name, folder in found.items())
        raise HubExportError(f"{path} holds several exports, one Hub repository each: {listed}. Fix: pick one with "
                             "--format (push_format= when pushing from draftkit.train)")
    return next(iter(found.values()))


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


def check_card(artifact: Path) -> str:
    card = artifact / CARD
    if not card.is_file():
        raise HubExportError(f"{artifact} has no model card ({CARD}); the recipe's exporter writes one. Fix: "
                             "re-export the run")
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise HubExportError(f"{card} has no YAML front matter, so the Hub would show no metadata. Fix: re-export "
                             "the run with this draftkit")
    if not re.search(r"^\|.*τ.*\|$", text, flags=re.M) and "(acceptance not measured" not in text:
        raise HubExportError(f"{card} carries no measured τ table. Fix: export after evaluation (eval=quick)")
    return text


def only_here(name_or_path: str) -> bool:
    """True for a model reference only this machine can resolve: a path (absolute, relative or home), a folder that
    exists here, or anything not shaped as a Hub id."""
    return (name_or_path.startswith(("/", ".", "~")) or Path(name_or_path).expanduser().exists()
            or not re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path))


def uploaded_config(artifact: Path, verifier: str | None = None) -> dict | None:
    """The config.json to upload in place of the folder's own, None to upload it as it is. A speculators export names
    its target (speculators_config.verifier), which `vllm serve <repo>` loads wherever the repo is served: `verifier`
    (a Hub id) replaces it in the upload; without one, a target only this machine can find is refused."""
    config = json.loads((artifact / "config.json").read_text())
    speculators = config.get("speculators_config")
    if speculators is None:
        if verifier is not None:
            raise HubExportError(f"--verifier {verifier}: {artifact} is not a speculators export, the only kind that "
                                 "names its target. Fix: leave --verifier out")
        return None
    if verifier is not None:
        if only_here(verifier):
            raise HubExportError(f"--verifier {verifier!r} is not a Hub id: whoever serves the upload could not load "
                                 "it. Fix: the target's Hub id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
        speculators.setdefault("verifier", {})["name_or_path"] = verifier
        return config
    named = (speculators.get("verifier") or {}).get("name_or_path")
    if not named or only_here(named):
        raise HubExportError(f"{artifact / 'config.json'} names the verifier {named!r}, which only this machine can "
                             "find: `vllm serve` of the upload would not load the target. Fix: --verifier <the "
                             "target's Hub id> (e.g. HuggingFaceTB/SmolLM2-135M-Instruct), or export with "
                             "eagle3.export.verifier=<Hub id>")
    return None


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)  # weights are not copied when the staging folder shares their filesystem
    except OSError:
        shutil.copy2(source, destination)


def check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise HubExportError(f"repo id {repo_id!r} is not of the form <user or org>/<name>. Fix: e.g. "
                             "me/smollm2-draft")


def push_to_hub(path: str | Path, repo_id: str, *, fmt: str | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str | None = None, revision: str | None = None,
                verifier: str | None = None) -> str:
    """Upload one artifact (see find_artifact) to `repo_id` after every local check; returns the URL of the commit.
    Other artifacts nested in its folder (the EAGLE folders inside FSPAD's) are left out: each is its own repository.
    verifier: the target's Hub id for a speculators export's config (see uploaded_config); the folder is not changed,
    the upload is staged beside it."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    artifact = find_artifact(path, fmt)
    check_card(artifact)
    check_tensors(artifact)
    config = uploaded_config(artifact, verifier)
    nested = [p.name for p in artifact.iterdir() if p.is_dir() and is_artifact(p)]
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(dir=artifact.parent, prefix=".upload-") as staging:
        folder = artifact
        if config is not None:
            folder = Path(staging) / artifact.name
            shutil.copytree(artifact, folder, ignore=shutil.ignore_patterns(*nested), copy_function=_link_or_copy)
            (folder / "config.json").unlink()  # a link to the folder's own file: replaced, not written through
            (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 commit_message=commit_message or f"Upload draft model from draftkit ({artifact})",
                                 ignore_patterns=[".*", *(f"{name}/*" for name in nested)])
    return str(getattr(info, "commit_url", info))
