"""Draft heads with a restricted draft vocabulary (medusa, hydra_heads, clover with draft_vocab_size): lossless tree
decoding with proposals in target ids, pinned restricted-vocabulary losses checked against a hand-built reference,
short recipe runs whose exports load in draftkit-eval, the vLLM truncated-vocabulary format, and bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from draftkit.config import compose
from draftkit.drafts.clover import clover2
from draftkit.drafts.hydra_heads import hydra_heads
from draftkit.drafts.medusa import medusa_heads
from draftkit.drafts.vocab import draft_rows
from draftkit.eval import main as eval_main
from draftkit.export.artifact import ArtifactError
from draftkit.export.heads_dir import export_heads_dir, load_heads_dir
from draftkit.export.medusa import export_medusa_fasterdecoding, export_medusa_vllm, load_medusa
from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.recipes import clover as clover_recipe
from draftkit.recipes import hydra_heads as hydra_recipe
from draftkit.recipes import medusa as medusa_recipe
from draftkit.recipes.hydra_heads import hydra_step
from draftkit.recipes.medusa import heads_step
from draftkit.runtime.clover import CloverDrafter
from draftkit.runtime.hydra_heads import HydraDrafter
from draftkit.runtime.medusa import MedusaDrafter
from draftkit.runtime.speculative import autoregressive_generate
from draftkit.runtime.tree import tree_generate, tree_shape
from test_runtime import target  # noqa: F401  (a sharpened tiny target: greedy comparisons are not trivial)

I = IGNORE_INDEX
PROMPT = torch.tensor([[1, 50, 60, 70, 80]])
MAX_NEW = 20


@pytest.fixture(scope="module")
def greedy(target):
    return autoregressive_generate(target.model, PROMPT, max_new_tokens=MAX_NEW).tokens


@pytest.fixture(scope="module")
def token_map(target, greedy):
    """The greedy continuation's tokens (so some proposals can be accepted) and every third other id: draft ids and
    target ids differ almost everywhere."""
    kept = set(greedy) | set(range(0, target.vocab_size, 3))
    return torch.tensor(sorted(kept), dtype=torch.long)


def perturbed(module, seed=0, std=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 2 and "lm_heads" not in name:
                p.add_(torch.randn(p.shape, generator=generator) * std)
    return module.eval()


class ProposalLog:
    """A TreeDrafter that passes every call to `drafter` and keeps each tree it proposes."""

    def __init__(self, drafter):
        self.drafter, self.max_depth, self.trees = drafter, drafter.max_depth, []

    def reset(self):
        self.drafter.reset()

    def propose_tree(self, step):
        tree = self.drafter.propose_tree(step)
        self.trees.append(tree)
        return tree

    @property
    def tokens(self) -> list[int]:
        return [token for tree in self.trees for token in tree.tokens.tolist()]


def restricted_drafter(family, target, token_map, shape):
    W = target.lm_head.weight
    if family == "medusa":
        heads = perturbed(medusa_heads(target.hidden_size, target.vocab_size, num_heads=3, num_layers=2,
                                       token_map=token_map))
        return MedusaDrafter(heads, shape, shared_lm_head=draft_rows(W, token_map))
    if family in ("hydra", "hydra++"):
        heads = perturbed(hydra_heads(target.hidden_size, target.vocab_size, num_heads=3, num_layers=2,
                                      lm_head="own", prefix_layer=family == "hydra++", target_config=target.config,
                                      lm_head_weight=W, token_map=token_map))
        return HydraDrafter(heads, target.embed_tokens, shape)
    decoder = target.model.get_decoder()
    model = clover2(target.hidden_size, num_heads=3, num_layers=1, target_config=target.config,
                    init_layer=decoder.layers[-1], final_norm=decoder.norm, token_map=token_map).eval()
    return CloverDrafter(model, W, draft_rows(W, token_map), shape)


@pytest.mark.parametrize("family", ["medusa", "hydra", "hydra++", "clover"])
@pytest.mark.parametrize("kind", ["chain", "static", "topk"])
def test_greedy_decoding_with_a_restricted_vocabulary_is_the_target_greedy_output(target, greedy, token_map,
                                                                                 family, kind):
    shape = tree_shape(kind, 3, top_k=3, width=2, budget=7)
    drafter = ProposalLog(restricted_drafter(family, target, token_map, shape))
    out = tree_generate(target.model, drafter, PROMPT, max_new_tokens=MAX_NEW)
    assert out.tokens == greedy
    # Proposals are target ids, all inside the draft vocabulary, and some are ids no draft id equals.
    assert drafter.tokens and set(drafter.tokens) <= set(token_map.tolist())
    assert max(drafter.tokens) >= len(token_map)


@pytest.mark.parametrize("family", ["medusa", "hydra++", "clover"])
def test_tree_sampling_runs_with_a_restricted_vocabulary(target, token_map, family):
    drafter = restricted_drafter(family, target, token_map, tree_shape("static", 3))
    out = tree_generate(target.model, drafter, PROMPT, acceptance="sampling", temperature=0.8, max_new_tokens=12,
                        generator=torch.Generator().manual_seed(0))
    assert len(out.tokens) == 12 and all(0 <= t < target.vocab_size for t in out.tokens)


def test_a_shared_lm_head_with_the_wrong_rows_is_refused(target, token_map):
    heads = medusa_heads(target.hidden_size, target.vocab_size, num_heads=2, token_map=token_map)
    with pytest.raises(ValueError, match="token_map rows"):
        MedusaDrafter(heads, tree_shape("chain", 2), shared_lm_head=target.lm_head.weight)


@pytest.mark.parametrize("family", ["medusa", "hydra", "clover"])
def test_a_tree_wider_than_the_draft_vocabulary_is_refused_before_decoding(target, family):
    tiny_map = torch.tensor([1, 5, 9])
    with pytest.raises(ValueError, match="top 4 candidates of a node, but the draft scores only 3 tokens"):
        restricted_drafter(family, target, tiny_map, tree_shape("topk", 2, top_k=4))
    with pytest.raises(ValueError, match="top 4 candidates"):
        restricted_drafter(family, target, tiny_map, tree_shape("static", 2, paths=[[0], [3]]))
    restricted_drafter(family, target, tiny_map, tree_shape("static", 2, paths=[[0], [2], [0, 1]]))


def loss_batch(target, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 259, (2, 12), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = I  # a prompt: not scored
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def draft_id_of(token_map):
    """Target id -> draft id, built independently of drafts.vocab."""
    return {int(t): i for i, t in enumerate(token_map.tolist())}


def head_labels(labels, shift, token_map):
    """labels[:, t + shift] in draft ids, ignored past the end and outside the draft vocabulary."""
    ids = draft_id_of(token_map)
    out = torch.full_like(labels, I)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - shift):
            label = int(labels[b, t + shift])
            out[b, t] = ids.get(label, I) if label != I else I
    return out


@pytest.mark.parametrize("loss_chunk_size", [None, 5])
def test_medusa_restricted_loss_is_cross_entropy_over_the_kept_rows(target, token_map, loss_chunk_size):
    heads = perturbed(medusa_heads(target.hidden_size, target.vocab_size, num_heads=2, token_map=token_map)).train()
    W = draft_rows(target.lm_head.weight, token_map)
    batch = loss_batch(target)
    out = heads_step(target, W, decay=0.8, loss_chunk_size=loss_chunk_size, token_map=token_map)(heads, batch)
    loss = (out.loss_sum / out.count).item()
    assert loss == pytest.approx(14.254287, abs=1e-5)

    hidden = target.features(batch["input_ids"], batch["attention_mask"], with_logits=False).last_hidden
    total, count = 0.0, None
    for k in range(2):
        targets = head_labels(batch["labels"], 2 + k, token_map)
        logits = F.linear(heads.blocks[k](hidden), W)
        total = total + 0.8 ** (k + 1) * F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        count = (targets != I).sum() if k == 0 else count
    assert loss == pytest.approx((total / count).item(), rel=1e-6)


@pytest.mark.parametrize("loss_chunk_size", [None, 5])
def test_hydra_restricted_loss_renormalises_the_teacher_over_the_kept_rows(target, token_map, loss_chunk_size):
    heads = perturbed(hydra_heads(target.hidden_size, target.vocab_size, num_heads=2, lm_head="own",
                                  lm_head_weight=target.lm_head.weight, token_map=token_map)).train()
    batch = loss_batch(target, seed=1)
    step = hydra_step(target, None, lm_weight=1.0, teacher_weight=0.5, decay=1.0, loss_chunk_size=loss_chunk_size,
                      own_lm_heads=heads.lm_heads, token_map=token_map)
    out = step(heads, batch)
    loss = (out.loss_sum / out.count).item()
    assert loss == pytest.approx(35.758923, abs=1e-5)

    features = target.features(batch["input_ids"], batch["attention_mask"])
    states = heads(features.last_hidden, batch["input_ids"], target.embed_tokens, project=False)
    total, count = 0.0, None
    for i in range(2):
        targets = head_labels(batch["labels"], 2 + i, token_map)
        scored = targets != I
        logits = heads.lm_heads[i](states[i])
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        # The teacher of head i at t is the target at t + 1 + i, over the kept tokens only.
        teacher = features.logits[:, 1 + i:][..., token_map].softmax(-1)
        length = teacher.shape[1]
        soft = -(teacher * logits[:, :length].log_softmax(-1)).sum(-1)[scored[:, :length]].sum()
        total = total + ce + 0.5 * soft
        count = scored.sum() if i == 0 else count
    assert loss == pytest.approx((total / count).item(), rel=1e-6)


def run(recipe, name, run_dir, *overrides):
    cfg = compose([f"+recipe={name}", "+debug=tiny", f"hydra.run.dir={run_dir}", *overrides])
    cfg.run_dir = str(run_dir)
    return recipe.run(cfg, run_dir)


def losses(run_dir):
    return [h["loss"] for h in json.loads((run_dir / "train" / "history.json").read_text())]


def eval_export(export, target_dir, tmp_path):
    directory, _ = target_dir
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["hi"]}) + "\n")
    assert eval_main(["--draft", str(export), "--target", str(directory), "--prompts", str(prompts),
                      "--max-new-tokens", "6", "--no-progress", "--out", str(tmp_path / "eval")]) == 0
    return json.loads((tmp_path / "eval" / "eval.json").read_text())


def test_medusa_run_with_a_draft_vocabulary_trains_and_exports_vllm_truncated(tmp_path, target_dir):
    export = run(medusa_recipe, "medusa", tmp_path / "run", "medusa.draft_vocab_size=48",
                 "medusa.export.formats=[vllm]", "engine.lr=1e-2")
    history = losses(tmp_path / "run")
    assert history[-1] < history[0]
    vocab = json.loads((tmp_path / "run" / "draft_vocab.json").read_text())
    vllm = export / "vllm"
    config = json.loads((vllm / "config.json").read_text())
    assert config["truncated_vocab_size"] == 48 and config["vocab_size"] == 320 and config["original_lm_head"]
    tensors = load_file(str(vllm / "model.safetensors"))
    assert tensors["token_map"].dtype == torch.int64 and tensors["token_map"].tolist() == vocab["token_map"]
    assert tensors["lm_heads.0.weight"].shape == (48, 32)
    assert not (export / "fasterdecoding").exists()
    report = eval_export(vllm, target_dir, tmp_path)
    assert report["overall"]["outputs_differing_from_ar"] == 0


@pytest.mark.parametrize("variant", ["hydra", "hydra++"])
def test_hydra_run_with_a_draft_vocabulary_trains_and_round_trips(tmp_path, target_dir, variant):
    extra = (["hydra_heads.teacher_weight=1", "hydra_heads.lm_weight=0", "hydra_heads.heads.prefix_layer=true"]
             if variant == "hydra++" else ["hydra_heads.heads.lm_head=own"])
    export = run(hydra_recipe, "hydra_heads", tmp_path / "run", "hydra_heads.draft_vocab_size=48", "engine.lr=1e-2",
                 *extra)
    history = losses(tmp_path / "run")
    assert history[-1] < history[0]
    info = json.loads((export / "draftkit.json").read_text())
    assert info["draft_vocab_size"] == 48
    _, target = target_dir
    heads, _ = load_heads_dir(export, hydra_heads, family="hydra_heads", hidden_size=32, vocab_size=320,
                              target_config=target.config, lm_head_weight=target.lm_head.weight)
    assert heads.token_map.tolist() == json.loads((tmp_path / "run" / "draft_vocab.json").read_text())["token_map"]
    if heads.lm_heads is not None:
        assert heads.lm_heads[0].weight.shape == (48, 32)
    assert eval_export(export, target_dir, tmp_path)["overall"]["outputs_differing_from_ar"] == 0


def test_clover_run_with_a_draft_vocabulary_trains_and_round_trips(tmp_path, target_dir):
    export = run(clover_recipe, "clover", tmp_path / "run", "clover.draft_vocab_size=48")
    history = losses(tmp_path / "run")
    assert history[-1] < history[0]
    assert json.loads((export / "config.json").read_text())["draft_vocab_size"] == 48
    assert eval_export(export, target_dir, tmp_path)["overall"]["outputs_differing_from_ar"] == 0


def test_null_draft_vocabulary_exports_no_token_map(tmp_path, target):
    heads = medusa_heads(target.hidden_size, target.vocab_size, num_heads=2)
    assert heads.token_map is None and "token_map" not in heads.state_dict()
    out = export_medusa_vllm(heads, tmp_path / "v", target_name="tiny", target_lm_head=target.lm_head.weight)
    assert json.loads((out / "config.json").read_text())["truncated_vocab_size"] is None
    assert "token_map" not in load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("lm_head", ["own", "shared"])
def test_vllm_truncated_round_trip_is_exact(tmp_path, target, token_map, lm_head):
    heads = perturbed(medusa_heads(target.hidden_size, target.vocab_size, num_heads=2, lm_head=lm_head,
                                   lm_head_weight=target.lm_head.weight, token_map=token_map))
    out = export_medusa_vllm(heads, tmp_path / "v", target_name="tiny", dtype="float32",
                             target_lm_head=draft_rows(target.lm_head.weight, token_map))
    artifact = load_medusa(out)
    assert torch.equal(artifact.heads.token_map, token_map)
    for name, tensor in heads.state_dict().items():
        assert torch.equal(artifact.heads.state_dict()[name], tensor), name
    if lm_head == "shared":
        assert torch.equal(artifact.shared_lm_head, draft_rows(target.lm_head.weight, token_map))


def test_a_token_map_of_the_whole_vocabulary_exports_as_no_truncation(tmp_path, target):
    heads = medusa_heads(target.hidden_size, target.vocab_size, num_heads=2,
                         token_map=torch.arange(target.vocab_size))
    out = export_medusa_vllm(heads, tmp_path / "v", target_name="tiny", target_lm_head=target.lm_head.weight)
    assert json.loads((out / "config.json").read_text())["truncated_vocab_size"] is None
    assert load_medusa(out).heads.token_map is None


def test_heads_dir_without_its_token_map_is_refused(tmp_path, target, token_map):
    from safetensors.torch import save_file

    arch = {"num_heads": 2, "num_layers": 1, "lm_head": "shared", "prefix_layer": False, "dropout": 0.0}
    heads = hydra_heads(target.hidden_size, target.vocab_size, **arch, token_map=token_map)
    out = export_heads_dir(heads, tmp_path / "h", family="hydra_heads", architecture=arch, target_name="tiny",
                           hidden_size=target.hidden_size, vocab_size=target.vocab_size)
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["token_map"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ArtifactError, match="no token_map"):
        load_heads_dir(out, hydra_heads, family="hydra_heads", vocab_size=target.vocab_size,
                       hidden_size=target.hidden_size)


def test_bad_draft_vocabulary_settings_are_one_clear_error(tmp_path, target, token_map):
    with pytest.raises(ValueError, match=r"draft_vocab_size=1000 must lie in \[1, 320\]"):
        run(hydra_recipe, "hydra_heads", tmp_path / "big", "hydra_heads.draft_vocab_size=1000", "eval=none")
    with pytest.raises(ValueError, match=r"FasterDecoding format has no truncated vocabulary.*formats=\[vllm\]"):
        run(medusa_recipe, "medusa", tmp_path / "fd", "medusa.draft_vocab_size=48")
    with pytest.raises(ValueError, match="Medusa-1 only.*medusa.draft_vocab_size=null"):
        run(medusa_recipe, "medusa", tmp_path / "joint", "medusa.draft_vocab_size=48", "medusa.joint=true",
            "medusa.export.formats=[vllm]")
    assert not (tmp_path / "fd" / "train").exists() and not (tmp_path / "joint" / "train").exists()
    heads = medusa_heads(target.hidden_size, target.vocab_size, num_heads=2, token_map=token_map)
    with pytest.raises(ArtifactError, match=r"Fix: medusa.export.formats=\[vllm\]"):
        export_medusa_fasterdecoding(heads, tmp_path / "f", target_name="tiny")
    with pytest.raises(ValueError, match="ascending"):
        medusa_heads(target.hidden_size, target.vocab_size, num_heads=2, token_map=token_map.flip(0))


@pytest.mark.parametrize("recipe", ["medusa", "hydra_heads", "clover"])
def test_every_heads_recipe_has_a_null_draft_vocabulary_by_default(recipe):
    assert compose([f"+recipe={recipe}"])[recipe].draft_vocab_size is None
