"""A plain PyTorch GPT, nanoGPT's shape and recipe, for `bench/quality.py` to score lmstack against.

The model is nanoGPT's `model.py` written small: token + learned position
embeddings, pre-LayerNorm blocks (causal attention through
`scaled_dot_product_attention`, exact GELU MLP), final LayerNorm, output
through the tied token embedding; GPT-2's initialization (every matrix
N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 * layers)), biases
zero). With `--block=llama` the blocks are Llama's, as Hugging Face's
`modeling_llama.py` computes them: no position table, rotary positions on
queries and keys (each head's halves turned), RMSNorm, a SwiGLU MLP of
`--mlp_dim`, `--kv_heads` key/value heads shared by groups of query heads, no
biases; the same initialization and output. AdamW with weight decay on the matrices only, linear warmup then
cosine decay to a tenth of the peak, global-norm clipping — each setting
taken from the command line, so the bench gives it exactly lmstack's
schedule and budget.

It reads the windows lmstack's own tf.data pipeline cut (an .npz with `train`
[N, T+1] and `val` [M, T+1] int32, written by bench/quality.py), draws a
batch of random training windows per step (numpy, seeded), and scores every
validation window once. Prints one JSON line.

usage: python bench/reference_gpt.py --data=windows.npz --steps=1500 --batch_size=32 \\
           --layers=4 --d_model=128 --heads=4 --learning_rate=2e-3 --warmup_steps=100 \\
           [--block=llama --kv_heads=2 --mlp_dim=344]
Needs torch (`make bench` installs it beside the lock).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.attn_proj(a)
        return x + self.mlp_proj(F.gelu(self.fc(self.ln2(x))))


def rotate(x, theta: float = 10_000.0):
    """Rotary positions of `[B, heads, T, hd]`, Hugging Face's half-split layout."""
    hd, t = x.shape[-1], x.shape[-2]
    frequencies = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.outer(torch.arange(t, dtype=torch.float32), frequencies)  # (T, hd/2)
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LlamaBlock(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, mlp_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.ln1, self.ln2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.q, self.kv = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * kv_heads * self.hd, bias=False)
        self.attn_proj = nn.Linear(d, d, bias=False)
        self.gate, self.up = nn.Linear(d, mlp_dim, bias=False), nn.Linear(d, mlp_dim, bias=False)
        self.mlp_proj = nn.Linear(mlp_dim, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q = self.q(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        k, v = (z.view(b, t, self.kv_heads, self.hd).transpose(1, 2) for z in self.kv(h).split(d // self.heads *
                                                                                               self.kv_heads, dim=2))
        group = self.heads // self.kv_heads
        k, v = rotate(k).repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        a = F.scaled_dot_product_attention(rotate(q), k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.attn_proj(a)
        h = self.ln2(x)
        return x + self.mlp_proj(F.silu(self.gate(h)) * self.up(h))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, layers: int, d: int, heads: int, block: str = "gpt2",
                 kv_heads: int = 0, mlp_dim: int = 0):
        super().__init__()
        self.llama = block == "llama"
        self.tokens = nn.Embedding(vocab, d)
        self.positions = None if self.llama else nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(LlamaBlock(d, heads, kv_heads or heads, mlp_dim) if self.llama else Block(d, heads)
                                    for _ in range(layers))
        self.ln_f = nn.RMSNorm(d, eps=1e-5) if self.llama else nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, ids):
        x = self.tokens(ids)
        if self.positions is not None:
            x = x + self.positions(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tokens.weight.T  # tied output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--kv_heads", type=int, default=0, help="llama: key/value heads (0: heads)")
    parser.add_argument("--mlp_dim", type=int, default=0, help="llama: the SwiGLU's hidden width")
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--beta_2", type=float, default=0.99)
    parser.add_argument("--clip_norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = np.load(args.data)
    train, val = torch.from_numpy(data["train"].astype(np.int64)), torch.from_numpy(data["val"].astype(np.int64))
    vocab, seq_len = int(data["vocab_size"]), train.shape[1] - 1
    model = GPT(vocab, seq_len, args.layers, args.d_model, args.heads, args.block, args.kv_heads, args.mlp_dim)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("positions")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and not n.startswith("positions"))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}],
                                  lr=args.learning_rate, betas=(0.9, args.beta_2))

    def lr_at(step):  # lmstack's schedule: linear warmup from 0, cosine to a tenth of the peak
        if step < args.warmup_steps:
            return args.learning_rate * step / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return args.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    rng = np.random.default_rng(args.seed)
    began = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = train[rng.integers(0, len(train), args.batch_size)]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_norm:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
        optimizer.step()
    wall = time.perf_counter() - began

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in val.split(64):
            logits = model(chunk[:, :-1])
            total += float(F.cross_entropy(logits.reshape(-1, vocab), chunk[:, 1:].reshape(-1), reduction="sum"))
            count += chunk[:, 1:].numel()
    nats = total / count
    name = "pytorch-llama" if args.block == "llama" else "pytorch-gpt"
    print(json.dumps({"model": name, "torch": torch.__version__, "val_loss_nats_per_token": nats,
                      "val_tokens": count, "train_tokens_per_s": round(args.steps * args.batch_size * seq_len / wall),
                      "wall_seconds": round(wall, 1), "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
