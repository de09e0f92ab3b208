"""What a model costs, from its config alone: parameters, FLOPs per token, training memory
(notebook 05).

An MoE layer's parameters are all stored and trained, but each token only runs top_k of the
experts: *total* parameters set the memory, *active* parameters set the compute. Counts follow
the module definitions in model.py exactly (tests compare them with sum(p.numel())).

FLOPs per token for training use the usual estimate (Kaplan et al. 2020, PaLM appendix B):
6 per active weight (2 forward, 4 backward) plus 12 * n_layer * n_head * head_dim * block_size
for the attention scores and their weighted sum (n_head * head_dim is n_embd unless head_size is
set). The position embedding is a lookup and costs nothing; the token embedding counts once, as
the (tied) output projection.
"""

from dataclasses import dataclass

from .config import GPTConfig

# Bytes per parameter while training with AdamW: the weights, their gradients, and two
# moment estimates. "float32": everything fp32 (also what torch.autocast training keeps,
# since autocast only casts activations). "bfloat16": weights, grads and moments all bf16.
BYTES = {
    "float32": dict(weights=4, grads=4, adam=8),
    "bfloat16": dict(weights=2, grads=2, adam=4),
}


# Peak dense bf16 tensor-core TFLOP/s (no sparsity) of common GPUs, for model-FLOPs utilisation.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(device_name: str) -> float | None:
    """A GPU's peak bf16 TFLOP/s from its name (torch.cuda.get_device_name()), or None if unknown."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


@dataclass
class ModelInfo:
    total_params: int
    active_params: int  # used by one token: routed experts count top_k times, not n_experts
    train_flops_per_token: int  # forward + backward
    memory_bytes: dict  # {dtype: {"weights", "grads", "adam", "total"}}, activations excluded


def _linear(n_in, n_out, bias):
    return n_in * n_out + (n_out if bias else 0)


def _mlp_params(config: GPTConfig, hidden):
    """A feed-forward network of width `hidden`: SwiGLU's c_fc is twice as wide ([gate | up])."""
    C, bias = config.n_embd, config.bias
    fc_width = 2 * hidden if config.activation == "swiglu" else hidden
    return _linear(C, fc_width, bias) + _linear(hidden, C, bias)


def _norm_params(config: GPTConfig, dim):
    return 2 * dim if config.norm == "layernorm" and config.bias else dim  # RMSNorm: a weight only


def _attention_params(config: GPTConfig):
    C, bias = config.n_embd, config.bias
    q_width, kv_width = config.n_head * config.head_dim, config.kv_heads * config.head_dim
    params = _linear(C, q_width + 2 * kv_width, bias) + _linear(q_width, C, bias)
    if config.qk_norm == "head":
        params += 2 * config.head_dim
    elif config.qk_norm == "projection":
        params += q_width + kv_width
    return params


def _block_params(config: GPTConfig, layer_idx: int) -> tuple[int, int]:
    """(total, active) parameters of one transformer block."""
    C = config.n_embd
    norms = 2 * _norm_params(config, C)
    attn = _attention_params(config)
    if not config.is_moe_layer(layer_idx):
        mlp = _mlp_params(config, config.mlp_width)
        return norms + attn + mlp, norms + attn + mlp
    moe = config.moe
    hidden = config.expert_width
    router = C * moe.n_experts * (2 if moe.noisy_gating else 1)
    expert = _mlp_params(config, hidden)
    shared = _mlp_params(config, moe.n_shared_experts * hidden) if moe.n_shared_experts else 0
    total = norms + attn + router + moe.n_experts * expert + shared
    active = norms + attn + router + moe.top_k * expert + shared
    return total, active


def model_info(config: GPTConfig) -> ModelInfo:
    C = config.n_embd
    position_table = config.block_size * C if config.position == "learned" else 0  # RoPE learns nothing
    embeddings = config.vocab_size * C + position_table  # wte (tied with lm_head) + wpe
    untied_head = 0 if config.tie_embeddings else config.vocab_size * C  # lm_head's own matrix
    final_norm = _norm_params(config, C)
    blocks = [_block_params(config, i) for i in range(config.n_layer)]
    total = embeddings + untied_head + final_norm + sum(t for t, _ in blocks)
    active = embeddings + untied_head + final_norm + sum(a for _, a in blocks)
    # Embedding lookups are not matmuls: wpe never, wte only when it is also the output layer.
    lookups = position_table + (0 if config.tie_embeddings else config.vocab_size * C)
    matmul_params = active - lookups
    attention_flops = 12 * config.n_layer * config.n_head * config.head_dim * config.block_size
    memory = {}
    for dtype, per_param in BYTES.items():
        parts = {name: total * nbytes for name, nbytes in per_param.items()}
        memory[dtype] = {**parts, "total": sum(parts.values())}
    return ModelInfo(total, active, 6 * matmul_params + attention_flops, memory)
