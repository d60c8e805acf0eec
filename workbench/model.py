"""A GPT-style transformer whose attention is causal or bidirectional per forward pass.

One architecture serves autoregressive (causal) and masked-diffusion (bidirectional) training, so the
objectives differ only in the loss. Pre-norm blocks, rotary position embeddings (RoPE, Su et al. 2021),
a GELU MLP, untied or tied embeddings. Every dropout site exists with p=0 so regularizers can switch it
on without touching this file: embedding, attention probabilities, attention output (residual), MLP hidden
activations and MLP output. Attention runs through flash-attn when installed on CUDA, else PyTorch SDPA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional GPU extra
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

FLASH_DEVICES = ("cuda",)  # where flash-attn's kernel runs (tests/test_gpu_paths.py puts a stand-in on the CPU)


@dataclass
class TransformerConfig:
    vocab_size: int
    max_seq_len: int
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    mlp_ratio: float = 4.0
    norm: str = "rmsnorm"
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    init_std: float = 0.02
    attention: str = "auto"  # auto | sdpa | flash

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows rounded up to a multiple of 64 for fast matmuls; the extra ids never occur."""
        return 64 * math.ceil(self.vocab_size / 64)


def _norm(kind: str, dim: int) -> nn.Module:
    return nn.RMSNorm(dim, eps=1e-6) if kind == "rmsnorm" else nn.LayerNorm(dim, bias=False)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (L, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x1, x2) by position-dependent angles; x is (B, H, L, D)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.attn_dropout = nn.Dropout(0.0)  # its p is used on the attention probabilities (never applied as a module)
        self.resid_dropout = nn.Dropout(0.0)
        self.backend = cfg.attention

    def forward(self, x, cos, sin, causal: bool, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, width // self.n_heads).unbind(dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout_p = self.attn_dropout.p if self.training else 0.0
        if self._use_flash(q, attn_mask):  # flash-attn takes and returns (B, L, H, D)
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                                causal=causal).transpose(1, 2)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=causal and attn_mask is None)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.resid_dropout(self.proj(y))

    def _use_flash(self, q: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
        """flash-attn for 'auto' and 'flash' where it can run: installed, on a GPU, fp16/bf16 (autocast), and no
        explicit mask (prefix-LM masks go through SDPA)."""
        if self.backend == "sdpa" or attn_mask is not None or flash_attn_func is None:
            return False
        return q.device.type in FLASH_DEVICES and q.dtype in (torch.float16, torch.bfloat16)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, hidden, bias=False)
        self.hidden_dropout = nn.Dropout(0.0)  # after the nonlinearity ("inside" the MLP)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=False)
        self.output_dropout = nn.Dropout(0.0)  # on the MLP output, before the residual add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dropout(self.proj(self.hidden_dropout(F.gelu(self.fc(x), approximate="tanh"))))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = _norm(cfg.norm, cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = _norm(cfg.norm, cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, causal: bool, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, causal, attn_mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.embed_dropout = nn.Dropout(0.0)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = _norm(cfg.norm, cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layers)
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def hidden_states(self, input_ids: torch.Tensor, causal: bool = True, attn_mask: torch.Tensor | None = None,
                      zero_embed: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states (B, L, d_model).

        ``attn_mask``: bool (B, 1, L, L), True where a query may attend to a key (overrides ``causal``).
        ``zero_embed``: bool (B, L), positions whose input embedding is replaced by zeros."""
        length = input_ids.shape[1]
        if length > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(input_ids)
        if zero_embed is not None:
            x = x.masked_fill(zero_embed.unsqueeze(-1), 0.0)
        x = self.embed_dropout(x)
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        for block in self.blocks:
            x = block(x, cos, sin, causal, attn_mask)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, causal: bool = True, attn_mask: torch.Tensor | None = None,
                zero_embed: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, padded_vocab_size)."""
        return self.head(self.hidden_states(input_ids, causal, attn_mask, zero_embed))

    def num_params(self, non_embedding: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.head.weight.numel()
        return total
