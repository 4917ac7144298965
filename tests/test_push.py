"""`python -m draftkit.push`: every family's export folder passes the local checks (card with front matter, weights,
config), a run with several exports asks which one, nested exports stay out of an upload, and the old
`python -m draftkit.export` entry still works. Only the Hub's network calls are replaced."""

import json

import pytest

from draftkit import push
from draftkit.drafts.eagle3 import eagle3_drafter
from draftkit.drafts.fspad import feature_drafter
from draftkit.drafts.hydra_heads import hydra_heads
from draftkit.drafts.lm import llama_draft
from draftkit.drafts.medusa import medusa_heads
from draftkit.drafts.specdecpp import acceptance_head, draft_fingerprint
from draftkit.export import __main__ as old_cli
from draftkit.export.eagle3 import export_eagle3
from draftkit.export.fspad import export_feature_drafter
from draftkit.export.heads_dir import export_heads_dir
from draftkit.export.kangaroo import export_kangaroo
from draftkit.export.lm import export_hf_draft
from draftkit.export.medusa import export_medusa_fasterdecoding, export_medusa_vllm
from draftkit.export.specdecpp import export_specdecpp
from draftkit.recipes.kangaroo import build_adapter
from draftkit.targets.tiny import tiny_target

TABLE = "| | τ | α@1 |\n|---|---:|---:|\n| after training | 1.50 | 0.40 |"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One run folder per family, each exported by its own exporter (what its recipe writes under export/)."""
    root = tmp_path_factory.mktemp("exports")
    target = tiny_target()
    reference = target.reference()
    h, v = target.hidden_size, target.vocab_size
    tok = target.tokenizer
    draft = llama_draft(v, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
                        target_model=target.model)
    lm = dict(target_name=target.name, target_vocab_size=v, target_reference=reference, eval_table_md=TABLE)
    export_hf_draft(draft, tok, root / "lm" / "export", recipe="fastdraft", num_assistant_tokens=3,
                    resolved_config_yaml="", **lm)
    heads = medusa_heads(h, v, num_heads=2, num_layers=1, lm_head="shared", lm_head_weight=target.lm_head.weight)
    export_medusa_vllm(heads, root / "medusa" / "export" / "vllm", target_name=target.name,
                       target_lm_head=target.lm_head.weight, eval_table_md=TABLE, target_reference=reference)
    export_medusa_fasterdecoding(heads, root / "medusa" / "export" / "fasterdecoding", target_name=target.name,
                                 eval_table_md=TABLE, target_reference=reference)
    eagle = feature_drafter(embed_weight=target.embed_tokens.weight, lm_head_weight=target.lm_head.weight,
                            num_heads=4, num_kv_heads=2, intermediate_size=64, feature_sampling=False,
                            partial_alignment=False)
    export_feature_drafter(eagle, root / "fspad" / "export", target_name=target.name, feature_norm="post_norm",
                           feature_layer=2, target_vocab_size=v, max_position_embeddings=2048,
                           num_speculative_tokens=3, resolved_config_yaml="", eval_table_md=TABLE,
                           target_reference=reference)
    eagle3 = eagle3_drafter(embed_weight=target.embed_tokens.weight, lm_head_weight=target.lm_head.weight,
                            norm_weight=target.model.get_decoder().norm.weight, num_aux_layers=3, num_heads=4,
                            num_kv_heads=2, intermediate_size=64)
    export_eagle3(eagle3, root / "eagle3" / "export", aux_layers=[1, 1, 1], target_name=target.name,
                  num_target_layers=target.num_layers, max_position_embeddings=2048, num_speculative_tokens=3,
                  resolved_config_yaml="", verifier_name_or_path="/models/target", eval_table_md=TABLE,
                  target_reference=reference)
    arch = {"num_heads": 2, "num_layers": 1, "lm_head": "shared", "prefix_layer": False, "dropout": 0.0}
    hydra = hydra_heads(**arch, hidden_size=h, vocab_size=v, target_config=target.config,
                        lm_head_weight=target.lm_head.weight)
    export_heads_dir(hydra, root / "hydra" / "export", family="hydra_heads", architecture=arch,
                     target_name=target.name, hidden_size=h, vocab_size=v, eval_table_md=TABLE,
                     target_reference=reference)
    export_kangaroo(build_adapter(target, 1, "target", seed=0), root / "kangaroo" / "export", target_name=target.name,
                    target_num_layers=target.num_layers, target_vocab_size=v, exit_layer=1, threshold=0.5,
                    max_draft_tokens=3, eval_table_md=TABLE, target_reference=reference)
    head = acceptance_head(16, num_layers=1)
    export_specdecpp(draft, head, tok, root / "specdecpp" / "export", head_info={"draft_fingerprint":
                     draft_fingerprint(draft), "threshold": 0.5, "min_tokens": 1, "max_draft_tokens": 3},
                     stop_policy={"num_speculative_tokens": 2}, resolved_config_yaml="", **lm)
    return root


FOLDERS = {"lm": "export", "medusa-vllm": "export/vllm", "medusa-fasterdecoding": "export/fasterdecoding",
           "fspad": "export", "fspad-eagle-vllm": "export/eagle-vllm", "fspad-eagle-sglang": "export/eagle-sglang",
           "eagle3": "export", "eagle3-speculators": "export/speculators", "eagle3-sglang": "export/sglang",
           "hydra": "export", "kangaroo": "export", "specdecpp": "export"}


@pytest.mark.parametrize("name", FOLDERS)
def test_every_family_export_is_pushable(exports, name, hub, capsys):
    folder = exports / name.split("-")[0] / FOLDERS[name]
    fmt = ["--format", "draftkit"] if name in ("fspad", "eagle3") else []  # the folder also holds runtime exports
    if name == "eagle3-speculators":  # its config names the target by a local path
        fmt = ["--verifier", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert push.main([str(folder), "me/draft", "--dry-run", *fmt]) == 0, capsys.readouterr().err
    assert f"would upload {folder}" in capsys.readouterr().out and hub == []
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "| after training | 1.50 |" in card
    assert "<target>" not in card and "```bash" in card


def test_a_run_with_several_exports_names_them_and_pushes_the_chosen_one(exports, hub, capsys):
    run = exports / "medusa"
    assert push.main([str(run), "me/heads"]) == 2
    err = capsys.readouterr().err
    assert "several exports" in err and "vllm (" in err and "fasterdecoding (" in err and hub == []
    assert push.main([str(run)]) == 0  # no repo id: list what the run holds
    assert "vllm: " in capsys.readouterr().out
    assert push.main([str(run), "me/heads", "--format", "vllm", "--private"]) == 0
    (_, _, created), (_, repo, upload) = hub
    assert repo == "me/heads" and created["private"] is True and upload["folder_path"] == str(run / "export" / "vllm")
    assert push.main([str(run), "me/heads", "--format", "eagle"]) == 2
    assert "no 'eagle' export" in capsys.readouterr().err


def test_pushing_fspads_own_format_leaves_the_nested_eagle_exports_out(exports, hub):
    assert push.main([str(exports / "fspad"), "me/fspad", "--format", "draftkit"]) == 0
    upload = hub[1][2]
    assert upload["folder_path"] == str(exports / "fspad" / "export")
    assert set(upload["ignore_patterns"]) == {".*", "eagle-vllm/*", "eagle-sglang/*"}


def test_the_old_entry_point_still_uploads_and_says_where_it_went(exports, hub, capsys):
    assert old_cli.main([str(exports / "lm"), "--push-to-hub", "me/lm"]) == 0
    assert "python -m draftkit.push" in capsys.readouterr().err
    assert [c[:2] for c in hub] == [("create_repo", "me/lm"), ("upload_folder", "me/lm")]


def test_every_flag_has_help():
    for action in push.parser()._actions:
        assert action.help and action.help.strip(), action.dest


def test_the_specdecpp_head_stays_with_its_draft(exports, hub):
    """The acceptance head folder is part of the SpecDec++ artifact (no card of its own), so it goes up with it."""
    assert push.main([str(exports / "specdecpp"), "me/sdpp"]) == 0
    assert hub[1][2]["ignore_patterns"] == [".*"]
    assert json.loads((exports / "specdecpp" / "export" / "draftkit.json").read_text())["head"] == "acceptance_head"


def test_a_speculators_export_goes_up_naming_the_targets_hub_id_and_never_a_local_path(exports, hub, capsys):
    folder = exports / "eagle3" / "export" / "speculators"
    own_config = (folder / "config.json").read_text()
    assert json.loads(own_config)["speculators_config"]["verifier"]["name_or_path"] == "/models/target"
    assert push.main([str(folder), "me/eagle3"]) == 2 and hub == []  # vllm serve elsewhere would not find the target
    err = capsys.readouterr().err
    assert "names the verifier '/models/target', which only this machine can find" in err and "--verifier" in err
    for bad in ("/models/target", "./target", "builtin:smollm2-135m-instruct"):
        assert push.main([str(folder), "me/eagle3", "--verifier", bad]) == 2 and hub == []
        assert "is not a Hub id" in capsys.readouterr().err
    assert push.main([str(folder), "me/eagle3", "--verifier", "HuggingFaceTB/SmolLM2-135M-Instruct"]) == 0
    uploaded = hub[1][2]["files"]
    config = json.loads(uploaded["config.json"])
    assert config["speculators_config"]["verifier"]["name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # the rest of the config and every other file go up as they are; the folder itself is unchanged, nothing is left
    del config["speculators_config"]["verifier"]["name_or_path"]
    expected = json.loads(own_config)
    del expected["speculators_config"]["verifier"]["name_or_path"]
    assert config == expected
    assert {name: data for name, data in uploaded.items() if name != "config.json"} == \
        {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "config.json"}
    assert (folder / "config.json").read_text() == own_config
    assert not list(folder.parent.glob(".upload-*"))


def test_a_verifier_is_refused_for_an_export_that_names_no_target(exports, hub, capsys):
    folder = exports / "medusa" / "export" / "vllm"
    assert push.main([str(folder), "me/heads", "--verifier", "HuggingFaceTB/SmolLM2-135M-Instruct"]) == 2
    assert "is not a speculators export" in capsys.readouterr().err and hub == []
