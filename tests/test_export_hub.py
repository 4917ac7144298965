"""Hub export: a real run's artifact is found, checked and handed to huggingface_hub; only the network calls
(create_repo, upload_folder) are replaced, and they record what they were given."""

import shutil

import pytest

from draftkit.config import compose
from draftkit.export import __main__ as export_cli
from draftkit.recipes import fastdraft


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose(["+recipe=fastdraft", "+debug=tiny", f"hydra.run.dir={run_dir}", "eval.before=false",
                   "eval.measure_speedup=false"])
    cfg.run_dir = str(run_dir)
    fastdraft.run(cfg, run_dir)
    return run_dir


def test_cli_uploads_the_export_with_its_model_card(run_dir, hub, capsys):
    assert export_cli.main([str(run_dir), "--push-to-hub", "me/tiny-draft", "--private"]) == 0
    (_, repo, create_kwargs), (_, repo2, upload) = hub
    assert repo == repo2 == "me/tiny-draft" and create_kwargs["private"] is True
    assert upload["folder_path"] == str(run_dir / "export")
    files = upload["files"]
    assert {"config.json", "model.safetensors", "README.md", "generation_config.json", "tokenizer.json"} <= set(files)
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "| after training |" in card and "τ" in card
    for snippet in ("assistant_model=draft", "vllm serve", "sglang.launch_server"):
        assert snippet in card
    assert "uploaded" in capsys.readouterr().out


def test_cli_refuses_a_directory_without_an_artifact_before_any_network_call(tmp_path, hub, capsys):
    assert export_cli.main([str(tmp_path), "--push-to-hub", "me/x"]) == 2
    assert "holds no exported draft" in capsys.readouterr().err and hub == []


def test_a_card_without_the_measured_table_is_refused(run_dir, tmp_path, hub, capsys):
    shutil.copytree(run_dir / "export", tmp_path / "export")
    card = tmp_path / "export" / "README.md"
    card.write_text("\n".join(line for line in card.read_text().splitlines() if not line.startswith("|")))
    assert export_cli.main([str(tmp_path), "--push-to-hub", "me/x"]) == 2
    assert "no measured τ table" in capsys.readouterr().err and hub == []


def test_bad_repo_id_is_refused(run_dir, hub, capsys):
    assert export_cli.main([str(run_dir), "--push-to-hub", "not a repo"]) == 2
    assert "not of the form" in capsys.readouterr().err and hub == []


def test_training_switch_pushes_at_the_end(tmp_path, hub, monkeypatch):
    import sys

    from draftkit import train

    monkeypatch.setattr(sys, "argv", ["draftkit.train"])
    train.main(["+recipe=fastdraft", "+debug=tiny", "eval.before=false", "eval.measure_speedup=false",
                "push_to_hub=me/end-of-run", f"hydra.run.dir={tmp_path}"])
    assert [c[:2] for c in hub] == [("create_repo", "me/end-of-run"), ("upload_folder", "me/end-of-run")]
    assert hub[1][2]["folder_path"] == str(tmp_path / "export")
