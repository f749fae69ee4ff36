"""The transformer's config: its shape, its block's kind, LoRA adapters, and the presets.

`models.gpt` builds and decodes the model a `GPTConfig` describes.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import ClassVar, Literal

from models import lora
from models.config import check_sizes


Init = Literal["glorot", "gpt2"]
INITS = typing.get_args(Init)
Activation = Literal["gelu", "gelu_tanh", "silu"]
ACTIVATIONS = typing.get_args(Activation)
Positions = Literal["learned", "rope"]
Norm = Literal["layernorm", "rmsnorm"]
Mlp = Literal["plain", "gated"]
Bias = Literal["all", "qkv", "none"]
INIT_STD = 0.02  # GPT-2's standard deviation for every weight matrix and embedding (models.gpt's "gpt2" init)


_LLAMA = dict(positions="rope", norm="rmsnorm", mlp="gated", activation="silu", bias="none")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT decoder.

    Attributes:
        vocab_size: token ids (from the tokenizer).
        seq_len: the context: the longest sequence the position table covers.
        layers: transformer blocks.
        d_model: width of the residual stream.
        heads: attention heads; d_model must divide by it.
        mlp_ratio: the MLP's hidden width is mlp_ratio * d_model.
        dropout: after the embedding, the attention output and the MLP (default: the training run
            decides: 0 for a run that sees its training data fewer than 2 times, else 0.1).
        init: glorot (Keras's defaults; embeddings N(0, 0.02)) or gpt2 (every weight matrix
            N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 * layers)), biases zero).
        activation: the MLP's: gelu (exact, with erf), gelu_tanh (GPT-2's tanh approximation,
            which its pre-trained weights expect) or silu (a gated MLP's: SwiGLU).
        positions: learned (a table added to the embedding; GPT-2) or rope (rotary, applied to
            queries and keys in every block; Llama).
        rope_theta: rotary positions' frequency base.
        norm: layernorm (GPT-2) or rmsnorm (Llama).
        norm_eps: the norms' epsilon.
        mlp: plain (act(x W1) W2) or gated (act(x Wg) * (x W1) W2; SwiGLU with silu).
        mlp_dim: the MLP's hidden width (default: mlp_ratio * d_model plain, two thirds of that
            rounded up to a multiple of 8 gated, which keeps the parameters).
        kv_heads: key/value heads, grouped-query attention (default: heads); heads must divide by it.
        bias: the projections with biases: all (GPT-2), qkv (query, key and value only; Qwen) or none (Llama).
        tie_embeddings: the output layer reuses the token embedding (else a matrix of its own).
        lora_rank: LoRA adapters of this rank on the `lora_targets` projections, whose trained weights
            freeze (`models.lora`); 0: none.
        lora_alpha: the adapters' update is scaled by lora_alpha / lora_rank (default: lora_rank, a
            scale of 1).
        lora_targets: the projections adapted: attention, mlp, or single ones (query, key, value,
            attention_output, mlp_gate, mlp_in, mlp_out).
    """
    # None dropout: `pipelines.train.run_dropout` decides; a model built with None has rate 0.
    # Glorot is the default init: at the small preset's budget GPT-2's starts slower and ends
    # 0.11 bits/char worse (docs/results.md, "Quality").
    vocab_size: int
    seq_len: int = 128
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float | None = None
    init: Init = "glorot"
    activation: Activation = "gelu"
    positions: Positions = "learned"
    rope_theta: float = 10_000.0
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    mlp: Mlp = "plain"
    mlp_dim: int | None = None
    kv_heads: int | None = None
    bias: Bias = "all"
    tie_embeddings: bool = True
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ("attention", "mlp")

    PRESETS: ClassVar[dict[str, dict]] = {
        "tiny": dict(seq_len=16, layers=2, d_model=32, heads=2, dropout=0.0),
        "small": dict(seq_len=128, layers=4, d_model=128, heads=4),
        "base": dict(seq_len=256, layers=6, d_model=384, heads=6),
        # GPT-2's shapes (124M and 355M parameters at its 50,257-token vocabulary), its GELU and init.
        "gpt2": dict(seq_len=1024, layers=12, d_model=768, heads=12, init="gpt2", activation="gelu_tanh"),
        "gpt2-medium": dict(seq_len=1024, layers=24, d_model=1024, heads=16, init="gpt2", activation="gelu_tanh"),
        # Llama's block (rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases) at
        # lmstack's shapes, and at SmolLM-135M's (Hugging Face's Llama-architecture 135M model).
        "llama-tiny": dict(seq_len=16, layers=2, d_model=32, heads=2, kv_heads=1, dropout=0.0, **_LLAMA),
        "llama-small": dict(seq_len=128, layers=4, d_model=128, heads=4, kv_heads=2, **_LLAMA),
        "llama-base": dict(seq_len=256, layers=6, d_model=384, heads=6, kv_heads=2, **_LLAMA),
        "smollm-135m": dict(seq_len=2048, layers=30, d_model=576, heads=9, kv_heads=3, mlp_dim=1536, init="gpt2",
                            **_LLAMA),
    }

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}: expected one of {', '.join(INITS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        for name, allowed in (("positions", Positions), ("norm", Norm), ("mlp", Mlp), ("bias", Bias)):
            choices = typing.get_args(allowed)
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(choices)}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} does not divide into heads={self.heads}")
        check_sizes(self, ("vocab_size", "seq_len", "layers", "d_model", "heads", "mlp_ratio"))
        if self.kv_heads is not None and (self.kv_heads < 1 or self.heads % self.kv_heads):
            raise ValueError(f"kv_heads={self.kv_heads}: heads={self.heads} must divide into it")
        if self.mlp_dim is not None and self.mlp_dim < 1:
            raise ValueError(f"mlp_dim={self.mlp_dim} must be at least 1")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions turn pairs of features: head size d_model/heads={self.head_dim} "
                             "must be even")
        if self.activation == "silu" and self.mlp != "gated":
            raise ValueError("activation=silu is the gated MLP's (SwiGLU): set mlp=gated too")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # a JSON list comes back a tuple
        if self.lora_rank < 0 or (self.lora_alpha is not None and self.lora_alpha <= 0):
            raise ValueError(f"lora_rank={self.lora_rank} and lora_alpha={self.lora_alpha} must be positive "
                             "(lora_rank 0: no adapters)")
        lora.projections(self.lora_targets)  # names no layer: ValueError
        if not (self.rope_theta > 0 and self.norm_eps > 0):
            raise ValueError(f"rope_theta={self.rope_theta} and norm_eps={self.norm_eps} must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def kv_dim(self) -> int:
        """Width of a token's keys (and of its values): what the cache holds per layer and position."""
        return self.num_kv_heads * self.head_dim

    @property
    def hidden_dim(self) -> int:
        """The MLP's hidden width."""
        if self.mlp_dim is not None:
            return self.mlp_dim
        plain = self.mlp_ratio * self.d_model
        if self.mlp == "plain":
            return plain
        return -(-(2 * plain // 3) // 8) * 8  # Llama's rule: 2/3 of the plain width, up to a multiple of 8

    def num_params(self) -> int:
        d, kv, f = self.d_model, self.kv_dim, self.hidden_dim
        qkv_bias = self.bias != "none"
        other_bias = self.bias == "all"
        attention = 2 * d * d + 2 * d * kv + qkv_bias * (d + 2 * kv) + other_bias * d
        mlp = (3 if self.mlp == "gated" else 2) * d * f + other_bias * ((2 if self.mlp == "gated" else 1) * f + d)
        norm = d if self.norm == "rmsnorm" or not other_bias else 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        positions = self.seq_len * d if self.positions == "learned" else 0
        return embeddings + positions + self.layers * (attention + mlp + 2 * norm + self._adapter_params()) + norm

    def _adapter_params(self) -> int:
        """A block's LoRA weights: rank x (in + out) per adapted projection."""
        if not self.lora_rank:
            return 0
        d, kv, f = self.d_model, self.kv_dim, self.hidden_dim
        shapes = {"query": (d, d), "key": (d, kv), "value": (d, kv), "attention_output": (d, d),
                  "mlp_gate": (d, f) if self.mlp == "gated" else (0, 0), "mlp_in": (d, f), "mlp_out": (f, d)}
        return sum(self.lora_rank * sum(shapes[p]) for p in lora.projections(self.lora_targets))

    @property
    def lora_alpha_or_rank(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    def flops_per_token(self) -> int:
        """Forward-pass FLOPs per token at full context (x3 for a training step).

        2 FLOPs per multiply-add of every matmul (projections, MLP, tied output)
        plus attention's QK^T and AV over `seq_len` keys (PaLM's convention).
        """
        d, kv, f = self.d_model, self.kv_dim, self.hidden_dim
        mlp = (3 if self.mlp == "gated" else 2) * d * f
        matmul_params = self.layers * (2 * d * d + 2 * d * kv + mlp) + self.vocab_size * d
        return 2 * matmul_params + 2 * 2 * self.layers * self.seq_len * d
