"""lmstack's language models: builders, configs with presets, cached decoders.

    config = models.make_config("transformer", "small", vocab_size=88, layers=2)
    model = models.build(config)                 # ids [B, T] -> logits [B, T, V]
    decoder = models.decoder(model, config)      # call_with_cache for generation
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

from models.gpt import GPTConfig, GPTDecoder, build_gpt
from models.lstm import LSTMConfig, LSTMDecoder, build_lstm

ModelConfig = Union[GPTConfig, LSTMConfig]
FAMILIES = {"transformer": GPTConfig, "lstm": LSTMConfig}


def family_of(config: ModelConfig) -> str:
    return "transformer" if isinstance(config, GPTConfig) else "lstm"


def make_config(family: str, preset: str, vocab_size: int, **overrides: Any) -> ModelConfig:
    """Preset + overrides -> a frozen config (None overrides are ignored)."""
    if family not in FAMILIES:
        raise ValueError(f"model {family!r}: expected one of {', '.join(FAMILIES)}")
    cls = FAMILIES[family]
    if preset not in cls.PRESETS:
        raise ValueError(f"preset {preset!r}: {family} has {', '.join(cls.PRESETS)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k, v in overrides.items() if v is not None and k not in fields)
    if unknown:
        raise ValueError(f"{family} has no setting {', '.join(unknown)}")
    values = {**cls.PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return cls(vocab_size=vocab_size, **values)


def config_to_json(config: ModelConfig) -> dict[str, Any]:
    """The config as JSON holds it (tuples as lists), with its family."""
    return {"family": family_of(config),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}}


def config_from_json(data: dict[str, Any]) -> ModelConfig:
    data = dict(data)
    return FAMILIES[data.pop("family")](**data)


def build(config: ModelConfig, seq_len: int | None = None):
    """The functional tf_keras model for a config."""
    return build_gpt(config, seq_len) if isinstance(config, GPTConfig) else build_lstm(config, seq_len)


def decoder(model, config: ModelConfig):
    """The incremental decoder (KV cache or LSTM state) over a built model's layers."""
    return GPTDecoder(model, config) if isinstance(config, GPTConfig) else LSTMDecoder(model, config)


def stats(config: ModelConfig) -> dict[str, int]:
    """Parameters and FLOPs per token (forward; a training step is ~3x)."""
    return {"params": config.num_params(), "flops_per_token": config.flops_per_token(),
            "train_flops_per_token": 3 * config.flops_per_token()}
