"""Randomly initialised text encoders for the named architectures: CLIP (with or without projection) and T5."""

from __future__ import annotations

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel


def _clip_text_config(
    tokenizer_len: int,
    hidden: int,
    layers: int,
    heads: int,
    ffn: int,
    max_length: int,
    projection_dim: int,
    hidden_act: str,
) -> CLIPTextConfig:
    # The tokenizers of tokenizers.py end with <|startoftext|>, <|endoftext|>; CLIP pools at the end token.
    return CLIPTextConfig(
        vocab_size=tokenizer_len,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=tokenizer_len - 2,
        eos_token_id=tokenizer_len - 1,
        pad_token_id=tokenizer_len - 1,
    )


def clip_text_encoder(
    tokenizer_len: int, hidden: int, layers: int, heads: int, ffn: int, max_length: int
) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder (quick-GELU, as OpenAI's) for a tokenizer of ``tokenizer_len`` ids."""
    config = _clip_text_config(tokenizer_len, hidden, layers, heads, ffn, max_length, hidden, "quick_gelu")
    return CLIPTextModel(config).eval()


def clip_text_encoder_with_projection(
    tokenizer_len: int,
    hidden: int,
    layers: int,
    heads: int,
    ffn: int,
    max_length: int,
    projection_dim: int,
    hidden_act: str = "quick_gelu",
) -> CLIPTextModelWithProjection:
    """A randomly initialised CLIP text encoder with its text projection (Stable Diffusion 3's two CLIPs).

    Args:
        tokenizer_len: ids of the tokenizer (a ``tokenizers.py`` CLIP tokenizer: start and end token last).
        hidden: width of the transformer.
        layers: transformer layers.
        heads: attention heads.
        ffn: MLP width.
        max_length: positions (the tokenizer's max length).
        projection_dim: width of the pooled, projected text embedding.
        hidden_act: ``"quick_gelu"`` (OpenAI's CLIP-L) or ``"gelu"`` (OpenCLIP's bigG).

    Example:
        >>> encoder = clip_text_encoder_with_projection(514, 8, 1, 2, 16, 16, projection_dim=4)
        >>> encoder.config.projection_dim, encoder.text_projection.weight.shape
        (4, torch.Size([4, 8]))
    """
    config = _clip_text_config(tokenizer_len, hidden, layers, heads, ffn, max_length, projection_dim, hidden_act)
    return CLIPTextModelWithProjection(config).eval()


def t5_encoder(vocab_size: int, d_model: int, d_ff: int, layers: int, heads: int, d_kv: int) -> T5EncoderModel:
    """A randomly initialised T5 v1.1 encoder (gated-GELU MLP, untied embeddings), as Stable Diffusion 3 uses.

    Args:
        vocab_size: embedding rows (at least the tokenizer's ids; T5 v1.1 has 32128).
        d_model: width.
        d_ff: MLP width (of each of the two gated branches).
        layers: encoder blocks.
        heads: attention heads.
        d_kv: width of each head (``heads * d_kv`` need not be ``d_model``).

    Example:
        >>> t5_encoder(112, 16, 32, 1, 2, 8).config.feed_forward_proj
        'gated-gelu'
    """
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()
