import json

from draftkit.engine.log import JsonlSink, NullSink, WandbSink


def test_jsonl_sink_appends_one_line_per_log(tmp_path):
    sink = JsonlSink(run_dir=str(tmp_path), run_config={"a": 1}, run_name="r")
    sink.log({"train/loss": 2.5}, step=1)
    sink.log({"train/loss": 2.0}, step=2)
    sink.summary({"tau": 1.7})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "train/loss": 2.5}, {"step": 2, "train/loss": 2.0}, {"summary": {"tau": 1.7}}]


def test_wandb_sink_runs_offline_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandbSink(run_dir=str(tmp_path), run_config={"engine": {"lr": 0.1}}, run_name="unit")
    assert sink.run.settings.mode == "offline"
    sink.log({"train/loss": 1.0}, step=1)
    sink.summary({"tau": 1.5})
    sink.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_null_sink_takes_the_run_arguments_and_writes_nothing(tmp_path):
    sink = NullSink(run_dir=str(tmp_path), run_config={"engine": {"lr": 0.1}}, run_name="y")
    sink.log({"a": 1}, step=0)
    sink.summary({"tau": 1.2})
    sink.finish()
    assert list(tmp_path.iterdir()) == []


def test_wandb_sink_records_group_config_and_git_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("RANK", raising=False)
    sink = WandbSink(run_dir=str(tmp_path), run_config={"engine": {"lr": 0.1}}, run_name="r", group="exp-1")
    assert sink.run.group == "exp-1"
    assert sink.run.config["engine"] == {"lr": 0.1}
    assert set(sink.run.config["git"]) == {"commit", "dirty"} and sink.run.config["git"]["commit"]
    first_id = sink.run.id
    sink.finish()
    again = WandbSink(run_dir=str(tmp_path), run_config={}, run_name="r", group="exp-1")
    assert again.run.id == first_id  # a resumed job continues its run
    again.finish()


def test_only_rank_zero_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    wandb_sink = WandbSink(run_dir=str(tmp_path / "w"), run_config={}, run_name="r")
    jsonl_sink = JsonlSink(run_dir=str(tmp_path / "j"))
    for sink in (wandb_sink, jsonl_sink):
        sink.log({"train/loss": 1.0}, step=1)
        sink.summary({"tau": 1.0})
        sink.finish()
    assert wandb_sink.run is None
    assert not (tmp_path / "w").exists() and not (tmp_path / "j").exists()
