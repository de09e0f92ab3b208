"""What real MoEs cost to store and to serve, from their published configs alone (notebook 05).

`costs` counts the package's own models; this module counts published ones: Mixtral-8x7B,
OLMoE-1B-7B, Qwen3-30B-A3B and DeepSeek-V3. `PublishedMoE` holds what the count needs, read from
a Hugging Face `config.json` by `from_hf_config`; `PUBLISHED` holds the four, with each value copied
from its model's file (no download). Tests build tiny versions with transformers' own classes and
check the counts exactly.

Total parameters set the memory, active ones (what one token runs through) the compute. Decoding
is another matter: one step produces one token per sequence of the batch and is bound by memory
bandwidth, so its cost is the bytes of weights it reads. Dense weights are read once per step
whatever the batch; an expert is read if at least one token of the batch picked it. At batch 1 a
step reads the active weights (less the embedding rows the token does not look up); as the batch
grows nearly every expert is read at every step, and the cost per token falls towards total bytes
/ batch. With routing uniform and tokens independent
(the assumption of `expected_experts_read`), a batch of B tokens reads E * (1 - (1 - k/E)^B) of the
E experts of a layer. A skewed router reads fewer: 1 - (1 - p)^B is concave in an expert's share p,
so uniform routing reads the most. Tokens of one sequence are not independent, but a decoding
batch holds one token of each of B sequences.

Not counted: biases (none of these models has any), DeepSeek-V3's e_score_correction_bias (a
buffer, 256 floats per layer) and its multi-token-prediction module (14B parameters, trained
with the model but not needed to generate).
"""

from dataclasses import dataclass

from .config import QK_NORMS

MODEL_TYPES = ("mixtral", "olmoe", "qwen3_moe", "deepseek_v3")  # the config.json kinds from_hf_config reads


@dataclass(frozen=True)
class PublishedMoE:
    """The sizes that fix a decoder-only SwiGLU MoE's parameter count and its KV cache."""

    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_experts: int  # routed experts per MoE layer
    top_k: int  # routed experts per token
    expert_hidden: int  # each expert's SwiGLU width (moe_intermediate_size)
    n_shared_experts: int = 0  # DeepSeekMoE: experts every token runs, expert_hidden wide each
    n_dense_layers: int = 0  # layers with one dense MLP instead of experts (DeepSeek-V3: the first 3)
    dense_hidden: int = 0  # that MLP's width (intermediate_size)
    tie_embeddings: bool = False  # the lm head reuses the token embedding matrix
    # Grouped-query attention: n_kv_heads key/value heads of head_dim, optional RMSNorm on q and k.
    n_kv_heads: int = 0
    head_dim: int = 0
    qk_norm: str = "none"  # "head": Qwen3 (over head_dim); "projection": OLMoE (over all of q, k)
    # Multi-head latent attention (DeepSeek): keys and values come from a kv_lora_rank-wide latent.
    kv_lora_rank: int = 0  # > 0 selects MLA
    q_lora_rank: int = 0  # 0: queries projected directly, without a latent
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0  # the rotary part of q and k; k's is shared by all heads and cached
    v_head_dim: int = 0

    def __post_init__(self):
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} with n_experts={self.n_experts}: use 1 <= top_k <= n_experts")
        if not 0 <= self.n_dense_layers < self.n_layers:
            raise ValueError(f"n_dense_layers={self.n_dense_layers} of n_layers={self.n_layers}: "
                             f"use 0 <= n_dense_layers < n_layers (an MoE needs an MoE layer)")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={self.qk_norm!r}: use one of {QK_NORMS}")
        if not (self.mla or self.n_kv_heads and self.head_dim):
            raise ValueError("no attention sizes: set n_kv_heads and head_dim (GQA) or kv_lora_rank (MLA)")

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers


def from_hf_config(hf: dict) -> PublishedMoE:
    """A PublishedMoE from a config.json dict of model_type mixtral, olmoe, qwen3_moe or deepseek_v3."""
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"model_type={kind!r} is not known here: use one of {MODEL_TYPES} or build a PublishedMoE")
    L = hf["num_hidden_layers"]
    common = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], n_layers=L,
                  n_heads=hf["num_attention_heads"], top_k=hf["num_experts_per_tok"],
                  tie_embeddings=hf.get("tie_word_embeddings", False))
    gqa = dict(n_kv_heads=hf["num_key_value_heads"],
               head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    if kind == "mixtral":  # every layer MoE; intermediate_size is the experts' width
        return PublishedMoE(**common, **gqa, n_experts=hf["num_local_experts"], expert_hidden=hf["intermediate_size"])
    if kind == "olmoe":
        return PublishedMoE(**common, **gqa, n_experts=hf["num_experts"], expert_hidden=hf["intermediate_size"],
                            qk_norm="projection")
    if kind == "qwen3_moe":  # as transformers' Qwen3MoeDecoderLayer decides which layers are MoE
        step, dense_only = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
        n_dense = sum(i in dense_only or (i + 1) % step != 0 for i in range(L))
        n_experts = hf.get("num_experts") or hf["num_local_experts"]  # the Hub's name, then transformers 5's
        return PublishedMoE(**common, **gqa, n_experts=n_experts, expert_hidden=hf["moe_intermediate_size"],
                            n_dense_layers=n_dense, dense_hidden=hf["intermediate_size"], qk_norm="head")
    # deepseek_v3: MLA, so no GQA sizes; the first first_k_dense_replace layers are dense
    return PublishedMoE(**common, n_experts=hf["n_routed_experts"], expert_hidden=hf["moe_intermediate_size"],
                        n_shared_experts=hf["n_shared_experts"], n_dense_layers=hf["first_k_dense_replace"],
                        dense_hidden=hf["intermediate_size"], kv_lora_rank=hf["kv_lora_rank"],
                        q_lora_rank=hf.get("q_lora_rank") or 0, qk_nope_head_dim=hf["qk_nope_head_dim"],
                        qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"])


# The fields of each model's config.json that the counts read (the files also set rope, norms' eps, ...).
_CONFIGS = {
    # huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json
    "Mixtral-8x7B": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                         num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False),
    # huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json
    "OLMoE-1B-7B": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, num_hidden_layers=16,
                        num_attention_heads=16, num_key_value_heads=16, intermediate_size=1024,
                        num_experts=64, num_experts_per_tok=8, tie_word_embeddings=False),
    # huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json (head_dim 128 though hidden / heads is 64)
    "Qwen3-30B-A3B": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
    # huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json (num_nextn_predict_layers=1: the
    # MTP module, left out); github.com/deepseek-ai/DeepSeek-V3 inference/configs/config_671B.json agrees
    "DeepSeek-V3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, num_hidden_layers=61,
                        num_attention_heads=128, num_key_value_heads=128, intermediate_size=18432,
                        first_k_dense_replace=3, moe_intermediate_size=2048, n_routed_experts=256,
                        n_shared_experts=1, num_experts_per_tok=8, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, tie_word_embeddings=False),
}
PUBLISHED = {name: from_hf_config(hf) for name, hf in _CONFIGS.items()}


# --- parameters ------------------------------------------------------------------------------

def _swiglu(hidden: int, width: int) -> int:
    return 3 * hidden * width  # gate (C, I), up (C, I), down (I, C)


def attention_params(m: PublishedMoE) -> int:
    """One layer's attention: projections, plus the RMSNorm weights inside it (q/k norm, MLA's latents)."""
    C, H = m.hidden_size, m.n_heads
    if m.mla:
        q_head = m.qk_nope_head_dim + m.qk_rope_head_dim  # each query head: a plain part and a rotary part
        if m.q_lora_rank:  # C -> latent (normed) -> heads
            q = C * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * H * q_head
        else:
            q = C * H * q_head
        kv = C * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank  # down to the latent + shared rotary key
        kv += m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim)  # latent -> every head's key and value
        return q + kv + H * m.v_head_dim * C
    q_width, kv_width = H * m.head_dim, m.n_kv_heads * m.head_dim
    qk_norm = {"none": 0, "head": 2 * m.head_dim, "projection": q_width + kv_width}[m.qk_norm]
    return C * (q_width + 2 * kv_width) + q_width * C + qk_norm


def _parts(m: PublishedMoE) -> dict:
    """Parameters by role, summed over layers; `expert` is one routed expert of one layer."""
    C = m.hidden_size
    return dict(
        embedding=m.vocab_size * C,  # a lookup table: a token reads one row of it
        lm_head=0 if m.tie_embeddings else m.vocab_size * C,
        attention=m.n_layers * attention_params(m),
        norms=(2 * m.n_layers + 1) * C,  # before attention, before the MLP, and the final one
        dense_mlps=m.n_dense_layers * _swiglu(C, m.dense_hidden),
        routers=m.n_moe_layers * m.n_experts * C,
        shared_experts=m.n_moe_layers * m.n_shared_experts * _swiglu(C, m.expert_hidden),
        expert=_swiglu(C, m.expert_hidden),
    )


def parameter_counts(m: PublishedMoE) -> tuple[int, int]:
    """(total, active): everything stored, and what one token runs through (top_k routed experts per
    MoE layer, the shared experts and all the rest, embedding table included as published counts do)."""
    parts = _parts(m)
    expert = parts.pop("expert")
    always = sum(parts.values())
    return always + m.n_moe_layers * m.n_experts * expert, always + m.n_moe_layers * m.top_k * expert


# --- serving ---------------------------------------------------------------------------------

def kv_cache_bytes_per_token(m: PublishedMoE, bytes_per_value: float = 2) -> float:
    """Bytes the KV cache grows by per token of context, over all layers. GQA stores a key and a
    value per KV head; MLA stores the latent and the shared rotary key, and rebuilds keys and values."""
    _check_positive(bytes_per_value=bytes_per_value)
    per_layer = m.kv_lora_rank + m.qk_rope_head_dim if m.mla else 2 * m.n_kv_heads * m.head_dim
    return m.n_layers * per_layer * bytes_per_value


def expected_experts_read(n_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts a batch of `batch` tokens picks in one layer, each token choosing
    top_k of n_experts uniformly and independently: an expert is missed by one token with
    probability 1 - k/E, by all of them with (1 - k/E)^B."""
    _check_positive(n_experts=n_experts, top_k=top_k, batch=batch)
    if top_k > n_experts:
        raise ValueError(f"top_k={top_k} > n_experts={n_experts}: a token picks at most all the experts")
    return n_experts * (1 - (1 - top_k / n_experts) ** batch)


def weight_bytes_per_token(m: PublishedMoE, batch: int, bytes_per_value: float = 2) -> float:
    """Bytes of weights one decoding step reads, divided by the tokens it produces (`batch`).

    Read once per step: attention, norms, dense MLPs, routers, shared experts and the lm head; of
    the embedding table, only the batch's rows; per MoE layer, the experts some token picked
    (expected_experts_read). At batch 1 that is the active parameters less the embedding rows
    the token does not look up (unless tied: then the lm head reads the whole table anyway)."""
    _check_positive(batch=batch, bytes_per_value=bytes_per_value)
    parts = _parts(m)
    expert, table = parts.pop("expert"), parts.pop("embedding")
    rows = table if m.tie_embeddings else min(batch, m.vocab_size) * m.hidden_size
    experts = m.n_moe_layers * expected_experts_read(m.n_experts, m.top_k, batch) * expert
    return (sum(parts.values()) + rows + experts) * bytes_per_value / batch


def _check_positive(**values):
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name}={value!r}: use a positive number")
