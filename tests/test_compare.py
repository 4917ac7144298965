"""benchmarks/compare.py's merge of comparison runs made apart (a GPU slot too short for every family)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402  (a script in benchmarks/, imported for its merge)


def run_result(families: dict, *, steps=200, gammas=(1, 5), save_every=1000, drift=(30.0, 28.0), date="2026-12-01"):
    settings = {"steps": steps, "limit_per_category": 2, "max_new_tokens": 96, "gamma": 5, "gammas": list(gammas),
                "temperature": 0.7, "target": "SmolLM2-135M-Instruct",
                "train_overrides": ["engine.lr=1e-3", f"engine.save_every={save_every}"], "family_overrides": {}}
    entries = {}
    for family, tau in families.items():
        report = {"prompts": 8, "tau": tau, "tau_ci": [tau - 0.1, tau + 0.1], "alpha": [tau - 1.0],
                  "speedup": tau / 1.2, "prediction": {}}
        entries[family] = {"export": f"/runs/{family}", "decoding": compare.FAMILIES[family][2],
                           "draft_parameters": 1_000_000, "greedy": report, "sampling": report,
                           "training": {"wall_s": 60.0, "train_tokens_per_s_mean": 1000.0}}
    return {"benchmark": "every draft family", "recipes": {f: compare.FAMILIES[f][0] for f in families},
            "command": "compare.py", "machine": {"gpu": "NVIDIA H200"}, "date": date, "settings": settings,
            "families": entries,
            "baseline_drift": {"ar_tokens_per_s_first": drift[0], "ar_tokens_per_s_last": drift[1],
                               "last_over_first": drift[1] / drift[0]}}


def test_merge_keeps_every_family_with_its_own_run_and_the_last_measurement_wins():
    first = run_result({"medusa": 1.2, "kangaroo": 1.1}, save_every=1000)
    second = run_result({"kangaroo": 1.3, "distillspec": 1.15}, gammas=(1, 3, 5), save_every=50, drift=(40.0, 39.0),
                        date="2026-12-08")
    merged = compare.merge([first, second], ["a.json", "b.json"])
    assert list(merged["families"]) == ["distillspec", "medusa", "kangaroo"]  # FAMILIES order
    assert merged["families"]["kangaroo"]["greedy"]["tau"] == 1.3
    assert merged["families"]["kangaroo"]["source"] == "b.json" and merged["families"]["medusa"]["source"] == "a.json"
    assert [s["families"] for s in merged["sources"]] == [["medusa"], ["distillspec", "kangaroo"]]
    assert merged["settings"]["gammas"] == [1, 3, 5] and merged["date"] == "2026-12-08"
    table = compare.markdown(merged)
    assert "In the run of medusa, plain decoding ran at 30.0" in table
    assert "In the run of distillspec, kangaroo, plain decoding ran at 40.0" in table
    assert table.count("| distillspec (chain) |") == 1
    assert "| 8 | 1.30 | [1.20, 1.40] |" in table and "per-prompt bootstrap" in table


def test_a_familys_own_overrides_travel_with_its_row_and_do_not_block_a_merge():
    first = run_result({"distillspec": 1.1, "medusa": 1.2})
    first["settings"]["family_overrides"] = {"distillspec": ["distillspec.num_prompts=1024"]}
    second = run_result({"distillspec": 1.15, "hydra": 1.3})
    second["settings"]["family_overrides"] = {"distillspec": ["distillspec.num_prompts=1024",
                                                              "distillspec.generation.teacher_batch_size=256"]}
    merged = compare.merge([first, second], ["a.json", "b.json"])
    assert merged["settings"]["family_overrides"] == second["settings"]["family_overrides"]
    assert merged["families"]["distillspec"]["source"] == "b.json"
    assert compare.merge([second, first], ["b.json", "a.json"])["settings"]["family_overrides"] == \
        first["settings"]["family_overrides"]


def test_merge_refuses_runs_with_a_different_budget():
    with pytest.raises(SystemExit, match="other settings.*steps"):
        compare.merge([run_result({"medusa": 1.2}), run_result({"hydra": 1.3}, steps=400)], ["a.json", "b.json"])


def test_write_merged_writes_the_table_json_and_plots(tmp_path):
    files = []
    for name, families in (("a.json", {"medusa": 1.2}), ("b.json", {"fspad": 1.16})):
        path = tmp_path / name
        path.write_text(json.dumps(run_result(families)))
        files.append(str(path))
    compare.write_merged(files, tmp_path / "out")
    stem = "compare_smollm2_135m_h200_2026-12-01_merged"
    merged = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
    assert list(merged["families"]) == ["medusa", "fspad"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(merged["plots"])
    assert "| fspad (dynamic tree) |" in (tmp_path / "out" / f"{stem}.md").read_text()
