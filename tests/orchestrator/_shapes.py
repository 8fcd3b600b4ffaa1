"""Real model configs (the fields of their public config.json that shape the weights) and the
parameter shapes of a Hugging Face checkpoint built from them, for planner and sharding tests."""

from __future__ import annotations

from typing import Any

QWEN3_8B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_hidden_layers": 36,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "attention_bias": False,
}

QWEN2_5_7B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "num_hidden_layers": 28,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}

LLAMA_3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "attention_bias": False,
}

MODELS = {"qwen3-8b": QWEN3_8B, "qwen2.5-7b": QWEN2_5_7B, "llama-3-8b": LLAMA_3_8B}


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def qkv_bias(config: dict[str, Any]) -> bool:
    # Qwen2 always has q/k/v biases (its config.json does not say so); others follow attention_bias.
    return config["model_type"] == "qwen2" or bool(config.get("attention_bias"))


def layer_shapes(
    config: dict[str, Any], layer: int, *, fused: bool = False
) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one decoder layer, in Hugging Face order."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    d = head_dim(config)
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    p = f"model.layers.{layer}"
    shapes: dict[str, tuple[int, ...]] = {f"{p}.input_layernorm.weight": (hidden,)}
    if fused:
        shapes[f"{p}.self_attn.qkv_proj.weight"] = (q + 2 * kv, hidden)
        if qkv_bias(config):
            shapes[f"{p}.self_attn.qkv_proj.bias"] = (q + 2 * kv,)
    else:
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            shapes[f"{p}.self_attn.{proj}_proj.weight"] = (rows, hidden)
            if qkv_bias(config):
                shapes[f"{p}.self_attn.{proj}_proj.bias"] = (rows,)
    shapes[f"{p}.self_attn.o_proj.weight"] = (hidden, q)
    if config["model_type"] == "qwen3":
        shapes[f"{p}.self_attn.q_norm.weight"] = (d,)
        shapes[f"{p}.self_attn.k_norm.weight"] = (d,)
    shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    if fused:
        shapes[f"{p}.mlp.gate_up_proj.weight"] = (2 * inter, hidden)
    else:
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
    shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
    return shapes


def model_shapes(
    config: dict[str, Any], *, fused: bool = False, layers: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a whole checkpoint (or its first `layers` layers)."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(config["num_hidden_layers"] if layers is None else layers):
        shapes.update(layer_shapes(config, layer, fused=fused))
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


# Smaller real models whose TP shards fall off the 128 grid: the per-channel fallback on shapes
# that SGLang and vLLM actually serve (Qwen2.5-7B cannot run at TP 8: 28 heads).
QWEN2_5_0_5B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "num_hidden_layers": 24,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}

QWEN2_5_1_5B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "num_hidden_layers": 28,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}
