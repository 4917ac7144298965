"""The teacher of Hydra++ and Clover-2 made inside the chunked loss, from the target's final states and the LM-head rows
the heads score: the same loss and head gradients as the full-logits path (with and without a draft vocabulary), and
the target's full logits never requested by the chunked steps."""

import pytest
import torch

from draftkit.drafts.clover import clover2
from draftkit.drafts.hydra_heads import hydra_heads
from draftkit.drafts.vocab import draft_rows
from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.recipes.clover import clover_step
from draftkit.recipes.hydra_heads import hydra_step
from test_runtime import target  # noqa: F401  (a sharpened tiny target: its distributions are not flat)
from test_vocab_heads import greedy, perturbed, token_map  # noqa: F401  (a draft vocabulary of the tiny target)

FAMILIES = ["hydra++", "hydra_own_heads", "hydra", "clover"]


def build(family, target, token_map):
    """(module, step for a loss_chunk_size) for one family on the tiny target, over token_map's rows (None: all)."""
    W = target.lm_head.weight
    if family == "clover":
        decoder = target.model.get_decoder()
        model = clover2(target.hidden_size, num_heads=3, num_layers=1, target_config=target.config,
                        init_layer=decoder.layers[-1], final_norm=decoder.norm, token_map=token_map)
        return perturbed(model).train(), lambda chunk: clover_step(target, W, 10.0, 1.0, 0.7, chunk,
                                                                   draft_rows(W, token_map), token_map)
    own = family == "hydra_own_heads"
    heads = perturbed(hydra_heads(target.hidden_size, target.vocab_size, num_heads=3, num_layers=2,
                                  lm_head="own" if own else "shared", prefix_layer=family == "hydra++",
                                  target_config=target.config, lm_head_weight=W, token_map=token_map)).train()
    shared = None if own else draft_rows(W, token_map)
    # Hydra++ (teacher only), own heads with both terms, and plain Hydra (no teacher).
    lm_weight, teacher_weight = {"hydra++": (0.0, 1.0), "hydra_own_heads": (0.5, 2.0), "hydra": (1.0, 0.0)}[family]
    return heads, lambda chunk: hydra_step(target, shared, lm_weight, teacher_weight, 0.9, chunk,
                                           heads.lm_heads, token_map)


def padded_chat_batch(seed=3):
    """Two rows: a prompt that is not scored, then a reply; the second row ends in padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 259, (2, 14), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -4:] = 0
    input_ids[1, -4:] = 2
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(module, step, batch):
    """The step's output and the gradients of its token-mean loss (what the loop steps on) for every parameter."""
    module.zero_grad(set_to_none=True)
    out = step(module, batch)
    (out.loss_sum / out.count).backward()
    return out, {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("vocab", ["full", "draft"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_chunked_teacher_gives_the_full_logits_loss_and_head_gradients(target, token_map, family, vocab):
    module, make_step = build(family, target, token_map if vocab == "draft" else None)
    batch = padded_chat_batch()
    plain, plain_grads = loss_and_grads(module, make_step(None), batch)
    chunked, chunked_grads = loss_and_grads(module, make_step(5), batch)
    close = dict(rtol=1e-5, atol=1e-5)  # fp32: chunked and plain sums differ in the order they add
    torch.testing.assert_close(chunked.loss_sum, plain.loss_sum, **close)
    assert chunked.count.item() == plain.count.item() > 0
    assert set(chunked.metrics) == set(plain.metrics)
    for key, value in plain.metrics.items():
        torch.testing.assert_close(chunked.metrics[key], value, **close, msg=key)
    assert set(chunked_grads) == set(plain_grads) and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, **close, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_chunked_steps_never_ask_the_target_for_its_full_logits(target, token_map, family):
    module, make_step = build(family, target, token_map)
    calls = []
    handle = target.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        make_step(2048)(module, padded_chat_batch())  # the recipes' default loss_chunk_size
        chunked_calls = len(calls)
        make_step(None)(module, padded_chat_batch())
    finally:
        handle.remove()
    assert chunked_calls == 0
    # The plain path is the reference: it still takes the full logits, and only when there is a teacher.
    assert len(calls) == (0 if family == "hydra" else 1)
