"""Randomly initialised CLIP text encoders for the named architectures."""

from __future__ import annotations

from transformers import CLIPTextConfig, CLIPTextModel


def clip_text_encoder(
    tokenizer_len: int, hidden: int, layers: int, heads: int, ffn: int, max_length: int
) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder (quick-GELU, as OpenAI's) for a tokenizer of ``tokenizer_len`` ids."""
    config = CLIPTextConfig(
        vocab_size=tokenizer_len,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",
        projection_dim=hidden,
        bos_token_id=tokenizer_len - 2,
        eos_token_id=tokenizer_len - 1,
        pad_token_id=tokenizer_len - 1,
    )
    return CLIPTextModel(config).eval()
