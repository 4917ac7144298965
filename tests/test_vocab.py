"""The draft vocabulary (drafts/vocab.py, data/draft_vocab.py, recipes.common.draft_token_map)."""

import json

import pytest
import torch

from draftkit.data.draft_vocab import label_counts
from draftkit.drafts import vocab
from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.recipes.common import draft_token_map
from draftkit.targets.tiny import tiny_target


def test_ignore_index_matches_the_objectives():
    assert vocab.IGNORE_INDEX == IGNORE_INDEX


def test_select_tokens_keeps_the_most_frequent_and_the_required_ids_in_order():
    counts = torch.tensor([5, 0, 9, 5, 1, 7, 0, 0])
    # 2 (9), 5 (7), then a tie at 5 between ids 0 and 3: the lower id wins; 6 is required despite no count.
    assert vocab.select_tokens(counts, 4, always=[6]).tolist() == [0, 2, 5, 6]
    assert vocab.select_tokens(counts, 3).tolist() == [0, 2, 5]


@pytest.mark.parametrize("size, always, message", [(0, [], "must lie in"), (9, [], "must lie in"),
                                                   (2, [8], "outside"), (1, [1, 2], "cannot hold")])
def test_select_tokens_rejects_bad_sizes(size, always, message):
    with pytest.raises(ValueError, match=message):
        vocab.select_tokens(torch.ones(8), size, always=always)


def test_labels_map_to_draft_ids_and_missing_tokens_are_ignored():
    token_map = torch.tensor([1, 4, 6])
    index = vocab.draft_index(token_map, 8)
    assert index.tolist() == [-1, 0, -1, -1, 1, -1, 2, -1]
    labels = torch.tensor([[IGNORE_INDEX, 4, 3], [6, 1, IGNORE_INDEX]])
    assert vocab.draft_labels(labels, index).tolist() == [[IGNORE_INDEX, 1, IGNORE_INDEX], [2, 0, IGNORE_INDEX]]


def test_full_vocab_logits_put_the_draft_distribution_back_on_target_ids():
    token_map = torch.tensor([0, 3, 5])
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    full = vocab.full_vocab_logits(logits, token_map, 6)
    probs = full.softmax(-1)
    assert torch.allclose(probs[0, token_map], logits.softmax(-1)[0])
    assert probs[0, [1, 2, 4]].sum() == 0


def test_check_token_map():
    vocab.check_token_map(torch.tensor([0, 2, 7]), 8)
    for bad, message in [(torch.tensor([2, 1]), "ascending"), (torch.tensor([0, 8]), "outside"),
                         (torch.tensor([0.0, 1.0]), "int64"), (torch.tensor([], dtype=torch.long), "non-empty")]:
        with pytest.raises(ValueError, match=message):
            vocab.check_token_map(bad, 8)


def test_label_counts_and_coverage():
    examples = [{"labels": [IGNORE_INDEX, 2, 2, 3]}, {"labels": [3, 2, IGNORE_INDEX]}]
    counts = label_counts(examples, 5)
    assert counts.tolist() == [0, 0, 3, 2, 0]
    assert vocab.coverage(counts, torch.tensor([2])) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="another model"):
        label_counts([{"labels": [7]}], 5)


def test_draft_token_map_is_cached_for_a_resumed_run(tmp_path):
    target = tiny_target(num_layers=2)
    eos = target.tokenizer.eos_token_id
    chats = [{"labels": [IGNORE_INDEX, 10, 10, 11, 12]}, {"labels": [11, 10, IGNORE_INDEX]}]
    assert draft_token_map(chats, None, target, tmp_path) is None
    token_map = draft_token_map(chats, 3, target, tmp_path)
    assert eos in token_map.tolist() and 10 in token_map.tolist() and 11 in token_map.tolist()
    record = json.loads((tmp_path / "draft_vocab.json").read_text())
    assert record["size"] == 3 and record["token_map"] == token_map.tolist()
    assert record["label_coverage"] == pytest.approx(5 / 6)
    # The cached set wins over the chats (a resumed run must train the same ids); another size recounts.
    assert draft_token_map([{"labels": [20, 21, 22]}], 3, target, tmp_path).tolist() == token_map.tolist()
    assert 20 in draft_token_map([{"labels": [20, 21, 22]}], 4, target, tmp_path).tolist()
