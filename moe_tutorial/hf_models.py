"""Llama-family checkpoints from Hugging Face as the package's GPT: Llama (dense), Mixtral,
Qwen3-MoE and OLMoE (notebooks 07-08).

They share one block, the modern one of notebook 07: RMSNorm, rotary positions, grouped-query
attention, SwiGLU, and softmax top-k routing in the MoE ones. What differs is a handful of
switches, each a GPTConfig / MoEConfig field here:

    model_type  QK-norm                   top-k weights      MoE blocks
    llama       -                         (dense)            none
    mixtral     -                         renormalised       all
    qwen3_moe   per head (over head_dim)  norm_topk_prob     every decoder_sparse_step-th
    olmoe       over the whole projection norm_topk_prob     all

`config_from_hf` maps a `config.json` dict onto a GPTConfig, field by field: every field is
honoured, known to have no effect on the outputs, or refused with its name and value. The
models are dropless (every token reaches its experts), so the capacity factors are set to
n_experts / top_k, which makes an expert's capacity the whole batch. `state_dict_from_hf` renames
and fuses the weights: q, k and v into c_attn, gate and up into c_fc ([gate | up]), and experts
stored either fused (transformers' `experts.gate_up_proj` (E, 2I, C)) or one by one, as the Hub's
files store them (`experts.N.gate_proj` for Qwen3 and OLMoE, `experts.N.w1/w2/w3` for Mixtral).
"""

import re

import torch

from .config import GPTConfig, MoEConfig

ARCHITECTURES = ("llama", "mixtral", "qwen3_moe", "olmoe")

# Fields read by config_from_hf for every architecture.
COMMON_FIELDS = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling", "hidden_act",
                 "intermediate_size", "attention_bias", "mlp_bias", "pretraining_tp", "tie_word_embeddings",
                 "max_position_embeddings", "router_aux_loss_coef", "model_type"}
# Fields that describe the checkpoint, tokenizer, training or generation, not the function computed.
NO_EFFECT = {"transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype", "torch_dtype",
             "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "initializer_range", "use_cache",
             "pad_token_id", "bos_token_id", "eos_token_id", "_name_or_path", "output_attentions",
             "output_router_logits", "id2label", "label2id", "tokenizer_class",
             "attention_dropout"}  # dropout: off at inference, and these checkpoints set 0
# Per architecture: the MoE fields read below (anything else is refused).
MOE_FIELDS = {
    "llama": set(),
    "mixtral": {"num_local_experts", "num_experts_per_tok", "router_jitter_noise", "sliding_window"},
    "qwen3_moe": {"num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "use_sliding_window",
                  "sliding_window", "max_window_layers"},
    "olmoe": {"num_experts", "num_experts_per_tok", "norm_topk_prob", "clip_qkv"},
}


def config_from_hf(hf: dict, block_size: int | None = None) -> GPTConfig:
    """The GPTConfig of a Hugging Face `config.json` dict. `block_size` caps the context (and
    the RoPE tables) below the checkpoint's max_position_embeddings, to save memory."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    unknown = sorted(set(hf) - COMMON_FIELDS - NO_EFFECT - MOE_FIELDS[model_type])
    if unknown:
        raise ValueError(f"{model_type} config field(s) {unknown} are not supported by this loader: refusing "
                         f"rather than computing something else")
    _require(hf, "hidden_act", "silu", "the SwiGLU experts use SiLU")
    _require(hf, "pretraining_tp", 1, "tensor-parallel slicing of the MLP is a training detail; 1 computes exactly")
    if hf.get("mlp_bias", False) != hf.get("attention_bias", False):
        raise ValueError(f"mlp_bias={hf.get('mlp_bias')} differs from attention_bias={hf.get('attention_bias')}: "
                         f"this model has one `bias` switch for all its Linear layers")
    rope = _rope_theta(hf)
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_size = hf.get("head_dim")
    if head_size is not None and head_size == n_embd // n_head and n_embd % n_head == 0:
        head_size = None  # the default
    positions = hf.get("max_position_embeddings", 2048)
    return GPTConfig(
        block_size=min(positions, block_size) if block_size else positions,
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
        n_kv_head=hf.get("num_key_value_heads") or n_head, head_size=head_size,
        bias=bool(hf.get("attention_bias", False)), mlp_hidden=hf["intermediate_size"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), position="rope", rope_theta=rope,
        activation="swiglu", qk_norm={"qwen3_moe": "head", "olmoe": "projection"}.get(model_type, "none"),
        moe=_moe_config(hf, model_type),
    )


def _moe_config(hf, model_type) -> MoEConfig | None:
    if model_type == "llama":
        return None
    n_experts = hf.get("num_experts") or hf.get("num_local_experts")
    top_k = hf["num_experts_per_tok"]
    dropless = n_experts / top_k  # capacity = the whole batch: nothing is ever dropped
    fields = dict(n_experts=n_experts, top_k=top_k, capacity_factor_train=dropless, capacity_factor_eval=dropless,
                  aux_loss_coef=hf.get("router_aux_loss_coef", 0.01), z_loss_coef=0.0)
    if model_type == "mixtral":
        if hf.get("sliding_window") is not None:
            raise ValueError(f"sliding_window={hf['sliding_window']}: sliding-window attention is not implemented "
                             f"(Mixtral-8x7B's config sets null)")
        fields.update(expert_hidden=hf["intermediate_size"], normalize_weights=True,
                      jitter=hf.get("router_jitter_noise", 0.0))
    elif model_type == "qwen3_moe":
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true: sliding-window attention is not implemented")
        dense_layers = sorted(hf.get("mlp_only_layers") or [])
        if dense_layers != list(range(len(dense_layers))):
            raise ValueError(f"mlp_only_layers={dense_layers}: only a leading run of dense layers (0, 1, ...) is "
                             f"supported, as MoEConfig.first_k_dense")
        fields.update(expert_hidden=hf["moe_intermediate_size"], normalize_weights=bool(hf.get("norm_topk_prob")),
                      every=hf.get("decoder_sparse_step", 1), first_k_dense=len(dense_layers))
    else:  # olmoe: the experts use intermediate_size
        if hf.get("clip_qkv") is not None:
            raise ValueError(f"clip_qkv={hf['clip_qkv']}: clipping q, k, v is not implemented (OLMoE-1B-7B sets null)")
        fields.update(expert_hidden=hf["intermediate_size"], normalize_weights=bool(hf.get("norm_topk_prob")))
    if top_k == 1:
        fields["normalize_weights"] = False  # one expert: transformers leaves its softmax probability as is
    return MoEConfig(**fields)


def _rope_theta(hf) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={params['rope_type']!r}: only the default rotary embedding is implemented "
                         f"(no scaling for longer contexts)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _require(hf, name, value, why):
    if name in hf and hf[name] != value:
        raise ValueError(f"{name}={hf[name]!r} is not supported (only {value!r}: {why})")


EXPERT_KEY = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
HUB_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral's per-expert names


def state_dict_from_hf(hf_state: dict, config: GPTConfig) -> dict:
    """The package's state dict from a Hugging Face one (fused or per-expert expert weights).

    Every tensor is used exactly once and every parameter of the model is filled: a name left
    over or missing raises, naming it."""
    hf_state = _fuse_per_expert(dict(hf_state), config)
    out = {}

    def take(name):
        if name not in hf_state:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        return hf_state.pop(name)

    out["transformer.wte.weight"] = take("model.embed_tokens.weight")
    out["transformer.ln_f.weight"] = take("model.norm.weight")
    if config.tie_embeddings:
        hf_state.pop("lm_head.weight", None)  # the same matrix as the embedding when tied
        out["lm_head.weight"] = out["transformer.wte.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(config.n_layer):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        out[dst + "ln_1.weight"] = take(src + "input_layernorm.weight")
        out[dst + "ln_2.weight"] = take(src + "post_attention_layernorm.weight")
        for kind in ("weight", "bias") if config.bias else ("weight",):
            out[dst + f"attn.c_attn.{kind}"] = torch.cat([take(src + f"self_attn.{p}_proj.{kind}") for p in "qkv"])
            out[dst + f"attn.c_proj.{kind}"] = take(src + f"self_attn.o_proj.{kind}")
        if config.qk_norm != "none":
            out[dst + "attn.q_norm.weight"] = take(src + "self_attn.q_norm.weight")
            out[dst + "attn.k_norm.weight"] = take(src + "self_attn.k_norm.weight")
        if config.is_moe_layer(i):
            out[dst + "mlp.router.gate.weight"] = take(src + "mlp.gate.weight")
            out[dst + "mlp.router.selection_bias"] = torch.zeros(config.moe.n_experts)  # softmax routers have none
            out[dst + "mlp.experts.c_fc"] = take(src + "mlp.experts.gate_up_proj").transpose(1, 2)  # (E, C, 2I)
            out[dst + "mlp.experts.c_proj"] = take(src + "mlp.experts.down_proj").transpose(1, 2)  # (E, I, C)
        else:
            for kind in ("weight", "bias") if config.bias else ("weight",):
                out[dst + f"mlp.c_fc.{kind}"] = torch.cat([take(src + f"mlp.gate_proj.{kind}"),
                                                           take(src + f"mlp.up_proj.{kind}")])
                out[dst + f"mlp.c_proj.{kind}"] = take(src + f"mlp.down_proj.{kind}")
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}  # recomputed
    if hf_state:
        raise ValueError(f"checkpoint tensors not used by a {config.n_layer}-layer model: {sorted(hf_state)[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


def _fuse_per_expert(hf_state, config):
    """Per-expert weights (the Hub's layout) -> transformers' fused (E, 2I, C) and (E, C, I)."""
    per_expert = {}
    for name in list(hf_state):
        match = EXPERT_KEY.match(name)
        if match:
            prefix, expert, proj = match.groups()
            per_expert.setdefault(prefix, {})[(int(expert), HUB_NAMES.get(proj, proj))] = hf_state.pop(name)
    for prefix, weights in per_expert.items():
        n_experts = config.moe.n_experts
        missing = [(e, p) for e in range(n_experts) for p in ("gate_proj", "up_proj", "down_proj")
                   if (e, p) not in weights]
        if missing:
            raise ValueError(f"{prefix}: missing expert weights {missing[:3]}")
        hf_state[prefix + ".gate_up_proj"] = torch.stack(
            [torch.cat([weights[(e, "gate_proj")], weights[(e, "up_proj")]]) for e in range(n_experts)])
        hf_state[prefix + ".down_proj"] = torch.stack([weights[(e, "down_proj")] for e in range(n_experts)])
    return hf_state


def from_transformers(hf_model, block_size: int | None = None):
    """The package's GPT with a loaded transformers model's weights (same outputs, in fp32)."""
    from .model import GPT  # here, not at import: model imports config, and this module is optional

    config = config_from_hf(hf_model.config.to_dict(), block_size)
    model = GPT(config)
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), config))
    return model.to(next(hf_model.parameters()).dtype)
