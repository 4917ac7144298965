import json
import os

# Offline and quiet by construction: no Hub, no W&B account, DeepSpeed on the CPU accelerator.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine two threads made them ~50x slower.
torch.set_num_threads(1)


@pytest.fixture
def hub(monkeypatch):
    """The Hub's network calls replaced by a record of what they were given (the only mock: the network boundary)."""
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in __import__("pathlib").Path(folder_path).iterdir() if p.is_file()}
        calls.append(("upload_folder", repo_id, {"folder_path": folder_path, "files": files, **kwargs}))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def user_error(capsys):
    """Run a command's main (draftkit.train, .eval, .export, .preflight) on arguments it must refuse, and return the one
    line it printed: exit status 2, no traceback, `draftkit.<cmd>: <what>. Fix: <how>` last on stderr."""
    def call(main, argv):
        capsys.readouterr()
        try:
            status = main(argv)
        except SystemExit as stop:
            status = stop.code
        err = capsys.readouterr().err
        assert status == 2, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and lines[-1].startswith("draftkit.") and "Fix: " in lines[-1], err[-3000:]
        assert sum(line.startswith("draftkit.") for line in lines) == 1, err[-3000:]
        return lines[-1]
    return call


@pytest.fixture
def chats_with_replies(tmp_path):
    """A chat file whose replies are the labels (`<recipe>.labels=data`): four questions and their answers."""
    path = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"the answer is {i * 7} because it is"}]} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """The tiny target saved as an HF directory (for CLIs that take --target) and the Target it was saved from."""
    from draftkit.targets.tiny import tiny_target

    directory = tmp_path_factory.mktemp("target")
    target = tiny_target()
    target.model.save_pretrained(directory)
    target.tokenizer.save_pretrained(directory)
    return directory, target
