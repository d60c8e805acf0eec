"""The transformer: causal vs. bidirectional attention per call, masks, RoPE, attention backends."""

from __future__ import annotations

import pytest
import torch

from workbench.model import Transformer, TransformerConfig, apply_rope, rope_tables


def tiny_net(**kwargs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=50, max_seq_len=16, n_layers=2, d_model=32, n_heads=4, **kwargs))


def test_causal_attention_never_sees_the_future_and_bidirectional_does():
    net = tiny_net().eval()
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 50
    causal_x, causal_y = net(x, causal=True), net(y, causal=True)
    assert torch.allclose(causal_x[:, :8], causal_y[:, :8], atol=1e-5)
    assert not torch.allclose(causal_x[:, 8:], causal_y[:, 8:], atol=1e-3)
    bidir_x, bidir_y = net(x, causal=False), net(y, causal=False)
    assert not torch.allclose(bidir_x[:, :8], bidir_y[:, :8], atol=1e-3)


def test_explicit_causal_mask_equals_is_causal_path():
    net = tiny_net().eval()
    x = torch.randint(0, 50, (3, 10))
    mask = torch.tril(torch.ones(10, 10, dtype=torch.bool))[None, None].expand(3, 1, 10, 10)
    assert torch.allclose(net(x, causal=True), net(x, attn_mask=mask), atol=1e-5)


def test_zero_embed_replaces_the_input_embedding_with_zeros():
    net = tiny_net().eval()
    x = torch.randint(0, 50, (1, 6))
    zero = torch.zeros(1, 6, dtype=torch.bool)
    zero[0, 2] = True
    other = x.clone()
    other[0, 2] = (x[0, 2] + 7) % 50  # the token at a zeroed position must not matter
    assert torch.allclose(net(x, zero_embed=zero), net(other, zero_embed=zero), atol=1e-6)
    assert not torch.allclose(net(x), net(other), atol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(32, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i: int, j: int) -> torch.Tensor:
        rotated_q = apply_rope(q.expand(1, 1, 32, 8), cos, sin)[0, 0, i]
        rotated_k = apply_rope(k.expand(1, 1, 32, 8), cos, sin)[0, 0, j]
        return rotated_q @ rotated_k

    assert torch.allclose(score(5, 2), score(20, 17), atol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


def test_tied_embeddings_share_one_matrix_and_vocab_is_padded():
    net = tiny_net(tie_embeddings=True)
    assert net.head.weight is net.embed.weight
    assert net.embed.weight.shape[0] == 64  # 50 rounded up to a multiple of 64
    assert tiny_net().num_params(non_embedding=False) > net.num_params(non_embedding=False)


def test_dropout_sites_are_inactive_in_eval_mode():
    net = tiny_net()
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    x = torch.randint(0, 50, (2, 8))
    net.train()
    assert not torch.allclose(net(x), net(x))
    net.eval()
    assert torch.allclose(net(x), net(x))


def test_sequence_longer_than_max_seq_len_is_rejected():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_net()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn vs. SDPA needs a CUDA device")
def test_flash_attention_matches_sdpa():
    pytest.importorskip("flash_attn", reason="flash-attn is an optional GPU extra (pip install '.[flash]')")
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=50, max_seq_len=64, n_layers=2, d_model=64, n_heads=4)
    flash = Transformer(cfg).cuda().to(torch.bfloat16).eval()
    sdpa = Transformer(TransformerConfig(**{**cfg.__dict__, "attention": "sdpa"})).cuda().to(torch.bfloat16).eval()
    sdpa.load_state_dict(flash.state_dict())
    x = torch.randint(0, 50, (4, 64), device="cuda")
    for causal in (True, False):
        assert torch.allclose(flash(x, causal=causal).float(), sdpa(x, causal=causal).float(), atol=3e-2)
