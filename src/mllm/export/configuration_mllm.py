"""Configuration of an mllm GPT for Hugging Face transformers (remote code).

`mllm export` copies this file as is into the exported folder, beside modeling_mllm.py; it imports
only transformers. Field names follow transformers' conventions (what mllm calls d_model is
`hidden_size`, layers `num_hidden_layers`, heads `num_attention_heads`, the SwiGLU hidden size
`intermediate_size`, the context `max_position_embeddings`).
"""

from transformers import PretrainedConfig


class MllmConfig(PretrainedConfig):
    """Shape of the decoder-only GPT mllm trains: learned absolute positions, Pre-LN blocks with
    LayerNorm (with bias), multi-head attention and a SwiGLU feed-forward whose linears have no
    biases, and an output head tied to the token embedding."""

    model_type = "mllm"

    vocab_size: int = 16000
    hidden_size: int = 1024
    intermediate_size: int = 2752
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5  # torch's nn.LayerNorm default, which mllm trains with
    attention_dropout: float = 0.0  # on the attention probabilities
    hidden_dropout: float = 0.0  # on the embeddings and on each block's two residual branches
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # What mllm wrote this folder from (version, checkpoint, step); `mllm export` recognises an
    # earlier export by it, and replaces only such a folder.
    mllm_export: dict | None = None

    def validate_architecture(self):
        """Part of transformers' `strict` validation of a config."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )


__all__ = ["MllmConfig"]
