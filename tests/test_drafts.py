import pytest
import torch

from draftkit.drafts.lm import count_parameters, llama_draft, pca_embedding, pretrained_draft


def test_draft_shares_the_target_vocabulary_and_is_seeded():
    a, b = llama_draft(300, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32), \
        llama_draft(300, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    assert a.config.vocab_size == 300
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert count_parameters(a) == sum(p.numel() for p in a.parameters())  # tied embedding listed once


def test_bad_head_shapes_are_refused():
    with pytest.raises(ValueError, match="hidden_size=30 must divide by num_heads=4"):
        llama_draft(100, hidden_size=30, num_heads=4)


def test_pca_embedding_keeps_the_target_token_geometry():
    torch.manual_seed(0)
    target = torch.randn(50, 8) @ torch.diag(torch.tensor([5.0, 4, 3, 2, 1, 0.1, 0.1, 0.1]))
    full = pca_embedding(target, 8)
    centered = target - target.mean(0)
    gram, projected_gram = centered @ centered.T, full @ full.T
    torch.testing.assert_close(projected_gram / projected_gram.norm(), gram / gram.norm(), atol=1e-4, rtol=1e-4)
    assert pca_embedding(target, 3).std().item() == pytest.approx(0.02, rel=1e-4)


def test_target_pca_init_is_applied_and_checked():
    target_embedding = torch.randn(300, 24)
    draft = llama_draft(300, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
                        embedding_init="target_pca", target_embedding=target_embedding)
    torch.testing.assert_close(draft.get_input_embeddings().weight, pca_embedding(target_embedding, 16))
    with pytest.raises(ValueError, match="needs the target's embedding"):
        llama_draft(300, hidden_size=16, num_heads=2, num_kv_heads=1, embedding_init="target_pca")
    with pytest.raises(ValueError, match="embedding_init='pca'"):
        llama_draft(300, hidden_size=16, num_heads=2, num_kv_heads=1, embedding_init="pca")


def test_pretrained_draft_refuses_another_vocabulary(tmp_path):
    llama_draft(300, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab_size=300 but the target has 320"):
        pretrained_draft(str(tmp_path), vocab_size=320)
