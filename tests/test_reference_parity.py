"""benchmarks/reference_parity.py's report: the paired τ difference and the merge of runs made apart."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reference_parity as parity  # noqa: E402  (a script in benchmarks/, imported for its report code)


def side(new_tokens: list[int], forwards: list[int], ids=None) -> dict:
    ids = ids or [str(i) for i in range(len(new_tokens))]
    return {"tau": sum(new_tokens) / sum(forwards), "tau_ci": [1.0, 2.0], "prompts": len(ids),
            "per_prompt": [[q, n, f] for q, n, f in zip(ids, new_tokens, forwards)]}


def test_paired_difference_is_the_pooled_tau_difference_on_the_shared_prompts():
    ours = side([30, 12, 50], [10, 8, 20], ids=["a", "b", "c"])
    theirs = side([30, 12, 50, 99], [12, 10, 25, 9], ids=["a", "b", "c", "only-theirs"])
    delta = parity.paired_tau_difference(ours, theirs)
    assert delta["prompts"] == 3
    assert delta["delta"] == pytest.approx(92 / 38 - 92 / 47)
    assert delta["ci"][0] <= delta["delta"] <= delta["ci"][1]


def test_pairing_removes_the_variation_between_prompts_that_both_sides_share():
    # Prompts differ widely in tau, but on every prompt draftkit accepts exactly one more token per 10 forwards: the
    # paired difference is 0.1 in every resample, while each side's own tau varies with the prompts drawn.
    base = [10, 40, 15, 35, 20, 30, 12, 38]
    ours, theirs = side([n + 1 for n in base], [10] * 8), side(base, [10] * 8)
    delta = parity.paired_tau_difference(ours, theirs)
    assert delta["delta"] == pytest.approx(0.1)
    assert delta["ci"] == pytest.approx([0.1, 0.1])


def test_identical_sides_differ_by_zero_and_a_reversed_pair_flips_the_sign():
    a, b = side([20, 25, 31], [10, 11, 12]), side([20, 25, 31], [11, 13, 12])
    assert parity.paired_tau_difference(a, a)["ci"] == [0.0, 0.0]
    forward, backward = parity.paired_tau_difference(a, b), parity.paired_tau_difference(b, a)
    assert backward["delta"] == pytest.approx(-forward["delta"])
    assert backward["ci"] == pytest.approx([-forward["ci"][1], -forward["ci"][0]])


def test_no_paired_difference_without_per_prompt_counts_or_shared_prompts():
    a = side([20, 25], [10, 11])
    assert parity.paired_tau_difference({"tau": 1.5}, a) is None
    assert parity.paired_tau_difference(a, side([20, 25], [10, 11], ids=["x", "y"])) is None


def part(families: dict, *, steps=1000, sha="abc", command="run ..."):
    """A `run` result with one eval per family: family -> (draftkit side, reference side)."""
    return {"benchmark": "reference parity", "budget": "gpu", "date": "2026-12-04",
            "settings": {"steps": steps, "micro_batch": 16, "lr": 1e-3, "warmup": 20, "max_length": 768,
                         "eval": {"limit_per_category": 5, "max_new_tokens": 128, "gamma": 5}},
            "machine": {"gpu": "NVIDIA H200", "torch": "2.11"}, "reproduce": command,
            "references": {n: {"repo": r.repo, "commit": r.commit} for n, r in parity.REFERENCES.items()},
            "data": {"conversations": 2048, "written": 2047, "sha256": sha},
            "families": {f: {"eval": {"static": {"draftkit": d, "reference": r}}, "patches": []}
                         for f, (d, r) in families.items()}}


def test_merge_joins_families_in_the_benchmarks_order_and_a_later_run_wins():
    first = part({"medusa": (side([9, 9], [6, 6]), side([9, 9], [7, 7])), "hydra": (side([9, 9], [8, 8]), {})},
                 command="run --families medusa,hydra")
    second = part({"hydra": (side([9, 9], [5, 5]), side([9, 9], [6, 6])), "eagle1": (side([9, 9], [4, 4]), {})},
                  command="run --families hydra,eagle1")
    merged = parity.merge([first, second], ["one.json", "two.json"])
    assert list(merged["families"]) == ["eagle1", "medusa", "hydra"]
    assert merged["families"]["hydra"]["source"] == "two.json"
    assert merged["families"]["hydra"]["eval"]["static"]["draftkit"]["tau"] == pytest.approx(1.8)
    assert merged["families"]["medusa"]["source"] == "one.json"
    assert merged["sources"] == [{"file": "one.json", "families": ["medusa", "hydra"], "reproduce": first["reproduce"]},
                                 {"file": "two.json", "families": ["hydra", "eagle1"],
                                  "reproduce": second["reproduce"]}]
    table = parity.markdown({**merged, "notes": ["a note"]})
    assert "| hydra | static | 1.800 [1.00–2.00] | 1.500 [1.00–2.00] | +0.300 [+0.30, +0.30] | 2 |" in table
    assert "- a note" in table and "`run --families hydra,eagle1`" in table


@pytest.mark.parametrize("change, named", [({"steps": 500}, "settings"), ({"sha": "other"}, "other data")])
def test_merge_refuses_runs_of_another_budget_or_other_data(change, named):
    one = part({"medusa": (side([9, 9], [6, 6]), {})})
    other = part({"hydra": (side([9, 9], [6, 6]), {})}, **change)
    with pytest.raises(SystemExit, match=named):
        parity.merge([one, other], ["one.json", "other.json"])


def test_merge_reads_per_prompt_counts_from_the_runs_eval_folders_and_checks_they_are_the_same_evaluation(tmp_path):
    old = part({"medusa": (side([9, 9], [6, 6]), side([9, 9], [7, 7]))})
    for record in old["families"]["medusa"]["eval"]["static"].values():
        del record["per_prompt"]  # a result written before the counts were kept
    report = {"overall": {"tau": 1.5, "prompts": 2},
              "categories": {"qa": {"tau": 1.5}},
              "prompts": [{"question_id": 81, "new_tokens": 9, "target_forwards": 6},
                          {"question_id": 82, "new_tokens": 9, "target_forwards": 6}]}
    (tmp_path / "medusa_draftkit_static").mkdir()
    (tmp_path / "medusa_draftkit_static" / "eval.json").write_text(json.dumps(report))
    merged = parity.merge([old], ["old.json"], [tmp_path])
    sides = merged["families"]["medusa"]["eval"]["static"]
    assert sides["draftkit"]["per_prompt"] == [["81", 9, 6], ["82", 9, 6]]
    assert "per_prompt" not in sides["reference"]  # no folder for it: left without, and the table shows no Δτ
    report["overall"]["tau"] = 1.4
    (tmp_path / "medusa_draftkit_static" / "eval.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="not the evaluation"):
        parity.merge([old], ["old.json"], [tmp_path])
