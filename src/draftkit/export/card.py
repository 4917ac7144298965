"""Model cards: the README.md every exported folder carries, so each one can be pushed to the Hub as it is and used from
its card alone: Hub front matter, the target by a name a runtime loads (with the exact checkpoint the draft was trained
against), the measured acceptance, and commands that run as written once the draft's path is filled in."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Sequence

ACCEPTANCE_NOTE = ("τ counts tokens per target forward including the bonus token (autoregressive decoding = 1.00); α_i "
                   "is the acceptance rate at draft position i given the earlier positions were accepted. Measured with "
                   "draftkit's speculative runtime on the prompts named above; wall-clock numbers depend on the "
                   "machine (on a CPU, or with a target this small, a speedup below 1x is expected: see the README).")
NOT_MEASURED = "(acceptance not measured: eval.enabled=false)"


def target_load_name(target_name: str, reference: dict | None) -> str:
    """The target as the snippets name it: an id or path a runtime loads, else a placeholder that says why."""
    if reference and reference.get("load"):
        return reference["load"]
    return f"<the target: {target_name} cannot be loaded outside draftkit>"


def draftkit_target(target_name: str, reference: dict | None) -> str:
    """What `python -m draftkit.eval --target` takes to rebuild the exact checkpoint the draft was trained against."""
    return (reference or {}).get("draftkit") or target_load_name(target_name, reference)


def is_hub_id(name: str | None) -> bool:
    return bool(name) and not name.startswith(("/", ".", "<")) and len(PurePosixPath(name).parts) == 2


def model_card(*, title: str, summary: str, target_name: str, target_reference: dict | None, eval_table: str,
               usage: Sequence[tuple[str, str, str]], tags: Sequence[str], library_name: str | None = None,
               extra: str = "") -> str:
    """usage: (heading, code language, code) per way of running the draft; `extra` is Markdown appended at the end."""
    load = target_load_name(target_name, target_reference)
    front = ["---"]
    if library_name:
        front.append(f"library_name: {library_name}")
    if is_hub_id(load):
        front.append(f"base_model: {load}")
    front += [f"tags: [{', '.join(['speculative-decoding', 'draftkit', *tags])}]", "---"]
    trained_against = (target_reference or {}).get("trained_against") or f"{target_name} (how it was made: not recorded)"
    lines = [*front, f"# {title}", "", summary, "", "## Target", "",
             f"`{load}`. Trained against {trained_against}.", "", "## Measured acceptance", "",
             eval_table or NOT_MEASURED, "", ACCEPTANCE_NOTE, "", "## Use it", ""]
    for heading, language, code in usage:
        lines += [f"{heading}:", f"```{language}", code.strip("\n"), "```", ""]
    if extra:
        lines += [extra.strip("\n"), ""]
    return "\n".join(lines)


def card_commands(folder) -> list[str]:
    """The shell commands of a folder's model card (each line of its bash blocks), for run summaries."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        return []
    commands, inside = [], False
    for line in card.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = line == "```bash"
        elif inside and line.strip():
            commands.append(line.strip())
    return commands
