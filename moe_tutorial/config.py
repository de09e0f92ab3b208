"""What a model is: GPTConfig (notebook 01) and, for its Mixture-of-Experts layers, MoEConfig
(notebooks 03-04).

A config describes the architecture only: two models with equal configs compute the same
function. Which kernel computes attention or dispatches tokens to experts is a runtime choice
(`model.Kernels`): it changes speed and memory, never the result, so it is not part of a config,
checkpoints do not record it and a resume never compares it.

Configs round-trip through plain dicts (`to_dict` / `GPTConfig.from_dict`), which is how
checkpoints and `save_pretrained` store them. `from_dict` also reads the flat layout written
before MoE options had a dataclass of their own (CONFIG_VERSION 1), and names any unknown field.
"""

import difflib
from dataclasses import asdict, dataclass, fields

CONFIG_VERSION = 2  # 1: one flat GPTConfig with every MoE option and the kernel names in it

ROUTINGS = ("token_choice", "expert_choice")
SECOND_EXPERT = ("all", "random")
SCORINGS = ("softmax", "sigmoid")  # sigmoid: DeepSeek-V3's per-expert affinities (notebook 07)
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")  # GPT-2's position embedding table, or rotary embeddings (notebook 07)
ACTIVATIONS = ("gelu", "swiglu")
QK_NORMS = ("none", "head", "projection")  # per head (Qwen3) or over the whole projection (OLMoE)


@dataclass
class MoEConfig:
    """Everything about a model's Mixture-of-Experts layers; validated on construction."""

    n_experts: int = 8
    top_k: int = 1  # experts per token: 1 = Switch, 2 = GShard / Mixtral
    every: int = 1  # every `every`-th block is MoE (2: the 2nd, 4th, ... block; indices 1, 3, ...)
    expert_hidden: int | None = None  # None: 4 * n_embd, the dense MLP's width
    n_shared_experts: int = 0  # DeepSeekMoE: experts every token uses, beside the routed ones
    routing: str = "token_choice"  # or "expert_choice" (sees the whole batch: not causal)
    capacity_factor_train: float = 1.25  # ST-MoE's defaults (the Switch paper sweeps 1.0 to 2.0)
    capacity_factor_eval: float = 2.0
    aux_loss_coef: float = 1e-2  # load-balancing loss weight (alpha)
    z_loss_coef: float = 1e-3  # router z-loss weight
    jitter: float = 0.0  # multiplicative noise on the router input, training only (Switch)
    noisy_gating: bool = False  # Shazeer 2017: learned softplus noise on the logits, training only
    second_expert: str = "all"  # "random": GShard's stochastic second expert (top_k >= 2)
    bias_update_rate: float = 0.0  # aux-loss-free balancing step (DeepSeek-V3's gamma); 0: off
    straight_through_gate: bool = False  # top-1: gate value 1, gradient of p (upcycled models)
    # Modern routers (notebook 07): DeepSeek-V3, Qwen3-MoE, OLMoE, Mixtral.
    scoring: str = "softmax"  # "sigmoid": independent per-expert affinities (DeepSeek-V3)
    normalize_weights: bool = True  # top_k > 1: chosen weights sum to 1 (Mixtral, DeepSeek-V3, released Qwen3-MoE;
    # not OLMoE): transformers' norm_topk_prob
    routed_scaling_factor: float = 1.0  # routed experts' weights are multiplied by this (DeepSeek-V3: 2.5)
    n_group: int = 1  # group-limited routing: experts in n_group groups (devices, nodes) ...
    topk_group: int = 1  # ... and a token may use experts of its topk_group best groups only
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3's sequence-wise balance loss weight (alpha, 1e-4 there)
    first_k_dense: int = 0  # the first k blocks keep a dense MLP (DeepSeek's first_k_dense_replace)
    aux_loss_warmup_steps: int = 0  # the balancing losses ramp from 0 to full over these optimizer steps
    min_capacity: int = 0  # bounds on an expert's slots, whatever capacity_factor gives
    max_capacity: int | None = None
    router_precision: str = "float32"  # "model": router matmul in the weights' dtype (transformers' Mixtral,
    # Qwen3-MoE, OLMoE do so; needed to reproduce their bf16 routing exactly), softmax in fp32 either way

    def __post_init__(self):
        for name in ("n_experts", "top_k", "every", "n_group", "topk_group"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.top_k > self.n_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} must be at most n_experts={self.n_experts}: "
                             f"a token cannot pick more experts than exist")
        if self.expert_hidden is not None and (not _is_int(self.expert_hidden) or self.expert_hidden < 1):
            raise ValueError(f"MoEConfig.expert_hidden must be a positive integer or None, got {self.expert_hidden!r}")
        if not _is_int(self.n_shared_experts) or self.n_shared_experts < 0:
            raise ValueError(f"MoEConfig.n_shared_experts must be an integer >= 0, got {self.n_shared_experts!r}")
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MoEConfig.{name} must be > 0 (1.0 = exactly the average load), "
                                 f"got {getattr(self, name)}")
        for name in ("aux_loss_coef", "z_loss_coef", "jitter", "bias_update_rate", "seq_aux_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("first_k_dense", "aux_loss_warmup_steps", "min_capacity"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.max_capacity is not None and (not _is_int(self.max_capacity) or self.max_capacity < 1):
            raise ValueError(f"MoEConfig.max_capacity must be a positive integer or None, got {self.max_capacity!r}")
        if self.max_capacity is not None and self.max_capacity < self.min_capacity:
            raise ValueError(f"MoEConfig.max_capacity={self.max_capacity} is below min_capacity={self.min_capacity}")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"MoEConfig.routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        for name, allowed in (("routing", ROUTINGS), ("second_expert", SECOND_EXPERT), ("scoring", SCORINGS),
                              ("router_precision", ("float32", "model"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MoEConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.expert_choice and self.bias_update_rate > 0:
            raise ValueError("MoEConfig.bias_update_rate (aux-loss-free balancing) biases a token's choice of "
                             "experts; with routing='expert_choice' experts choose and load is balanced already")
        if self.second_expert == "random" and self.top_k < 2:
            raise ValueError("MoEConfig.second_expert='random' needs top_k >= 2 (a second expert to route randomly)")
        if self.straight_through_gate and (self.top_k != 1 or self.routing != "token_choice"):
            raise ValueError("MoEConfig.straight_through_gate applies to top-1 token choice only (top-k gates are "
                             f"renormalised already); got top_k={self.top_k}, routing={self.routing!r}")

        self._check_modern_router()

    def _check_modern_router(self):
        if self.n_experts % self.n_group != 0:
            divisors = [g for g in range(1, self.n_experts + 1) if self.n_experts % g == 0]
            raise ValueError(f"MoEConfig.n_experts={self.n_experts} cannot be split into n_group={self.n_group} "
                             f"equal groups; pick n_group among {divisors}")
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig.topk_group={self.topk_group} is more than n_group={self.n_group}: a token "
                             f"cannot use more groups than exist")
        if self.n_group > 1 and self.top_k > self.topk_group * self.group_size:
            raise ValueError(f"MoEConfig.top_k={self.top_k} experts do not fit in topk_group={self.topk_group} groups "
                             f"of {self.group_size}: raise topk_group or lower top_k")
        if self.expert_choice:
            for name, default in (("scoring", "softmax"), ("n_group", 1), ("seq_aux_loss_coef", 0.0),
                                  ("routed_scaling_factor", 1.0)):
                if getattr(self, name) != default:
                    raise ValueError(f"MoEConfig.{name}={getattr(self, name)!r} is a token-choice option; with "
                                     f"routing='expert_choice' experts pick tokens by softmax probability")
        if self.scoring == "sigmoid" and self.top_k == 1 and self.normalize_weights:
            raise ValueError("MoEConfig.scoring='sigmoid' with top_k=1 and normalize_weights=True gives every token "
                             "weight 1 (no gradient reaches the router); set normalize_weights=False or top_k >= 2")
        if self.straight_through_gate and self.scoring != "softmax":
            raise ValueError("MoEConfig.straight_through_gate is defined for softmax scoring only")

    @property
    def expert_choice(self) -> bool:
        return self.routing == "expert_choice"

    @property
    def group_size(self) -> int:
        return self.n_experts // self.n_group


@dataclass
class GPTConfig:
    """A GPT's architecture (nanoGPT's GPTConfig); `moe` turns feed-forward layers into MoE layers."""

    block_size: int = 256  # longest context the position embedding covers
    vocab_size: int = 65  # tiny Shakespeare has 65 distinct characters
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # 0 for small, short runs: they underfit rather than overfit
    bias: bool = False  # biases in Linear and LayerNorm; GPT-2 checkpoints have them
    gelu_approximate: str = "none"  # "tanh": GPT-2's GELU, needed to reproduce its weights' outputs
    mlp_hidden: int | None = None  # dense MLP width; None: 4 * n_embd (GPT-2's n_inner)
    tie_embeddings: bool = True  # output layer shares the token embedding (GPT-2 does)
    moe: MoEConfig | None = None  # None: a dense MLP in every block
    # The modern block (notebook 07; Llama, Mixtral, Qwen3, OLMoE, DeepSeek-V3). Defaults: GPT-2's.
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-5
    position: str = "learned"  # or "rope": rotary embeddings on queries and keys, no position table
    rope_theta: float = 10000.0  # RoPE's base: wavelengths from 2 pi up to ~2 pi * rope_theta
    n_kv_head: int | None = None  # grouped-query attention: key/value heads (None: n_head; 1: multi-query)
    head_size: int | None = None  # channels per head; None: n_embd // n_head (Qwen3 sets it apart)
    qk_norm: str = "none"  # RMSNorm on queries and keys: "head" (Qwen3) or "projection" (OLMoE)
    activation: str = "gelu"  # or "swiglu": down(silu(gate(x)) * up(x)), in the MLP and the experts

    def __post_init__(self):
        if isinstance(self.moe, dict):  # as read back from a checkpoint or config.json
            self.moe = MoEConfig(**self.moe)
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.head_size is None and self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                f"(each head gets n_embd // n_head channels); pick e.g. "
                f"n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden is not None and (not _is_int(self.mlp_hidden) or self.mlp_hidden < 1):
            raise ValueError(f"GPTConfig.mlp_hidden must be a positive integer or None (4 * n_embd), "
                             f"got {self.mlp_hidden!r}")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"GPTConfig.gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ValueError(f"GPTConfig.moe must be a MoEConfig or None, got {type(self.moe).__name__}")
        if self.moe is not None and self.moe.every > self.n_layer:
            raise ValueError(f"MoEConfig.every={self.moe.every} is more than n_layer={self.n_layer}: no block would "
                             f"be an MoE layer (use moe=None for a dense model)")
        if self.moe is not None and not any(self.is_moe_layer(i) for i in range(self.n_layer)):
            raise ValueError(f"MoEConfig.first_k_dense={self.moe.first_k_dense} with every={self.moe.every} leaves "
                             f"no MoE block among n_layer={self.n_layer} (use moe=None for a dense model)")
        self._check_modern_block()

    def _check_modern_block(self):
        for name, allowed in (("norm", NORMS), ("position", POSITIONS), ("qk_norm", QK_NORMS),
                              ("activation", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.head_size is not None and (not _is_int(self.head_size) or self.head_size < 1):
            raise ValueError(f"GPTConfig.head_size must be a positive integer or None, got {self.head_size!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"GPTConfig.norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"GPTConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig.position='rope' rotates channel pairs: head_dim={self.head_dim} must be even")
        if self.n_kv_head is not None:
            if not _is_int(self.n_kv_head) or self.n_kv_head < 1 or self.n_head % self.n_kv_head:
                divisors = [d for d in range(1, self.n_head + 1) if self.n_head % d == 0]
                raise ValueError(f"GPTConfig.n_kv_head must divide n_head={self.n_head} (each key/value head "
                                 f"serves n_head // n_kv_head query heads): one of {divisors}, got {self.n_kv_head!r}")
        if self.norm == "layernorm" and self.qk_norm != "none":
            raise ValueError("GPTConfig.qk_norm uses RMSNorm, as every model that has it does: set norm='rmsnorm'")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def default_hidden(self) -> int:
        """A feed-forward width with the parameters of GPT-2's 4C GELU MLP: 4C, or for SwiGLU
        (three matrices instead of two) 8C/3 rounded to a multiple of 16."""
        if self.activation == "swiglu":
            return 16 * round(8 * self.n_embd / 3 / 16)
        return 4 * self.n_embd

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or self.default_hidden

    @property
    def expert_width(self) -> int:
        return self.moe.expert_hidden or self.default_hidden

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.moe is not None and layer_idx >= self.moe.first_k_dense
                and (layer_idx + 1) % self.moe.every == 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields_: dict, source="config") -> "GPTConfig":
        """The config a dict describes, from this version or version 1; unknown fields are named."""
        fields_ = upgrade_v1(fields_) if "moe" not in fields_ else dict(fields_)
        _refuse_unknown(cls, fields_, source)
        if isinstance(fields_.get("moe"), dict):
            _refuse_unknown(MoEConfig, fields_["moe"], source)
        try:
            return cls(**fields_)
        except (ValueError, TypeError) as err:  # TypeError: a value of the wrong type, e.g. "1.25"
            raise ValueError(f"{source}: {err}") from None


# Version 1 stored MoE options flat in GPTConfig, some under other names, and the kernel choices.
V1_MOE_FIELDS = {"n_experts": "n_experts", "top_k": "top_k", "moe_every": "every", "expert_hidden": "expert_hidden",
                 "n_shared_experts": "n_shared_experts", "router_type": "routing",
                 "capacity_factor_train": "capacity_factor_train", "capacity_factor_eval": "capacity_factor_eval",
                 "aux_loss_coef": "aux_loss_coef", "z_loss_coef": "z_loss_coef", "router_jitter": "jitter",
                 "noisy_gating": "noisy_gating", "second_expert_policy": "second_expert",
                 "bias_update_rate": "bias_update_rate", "straight_through_gate": "straight_through_gate"}
V1_KERNEL_FIELDS = ("attn_impl", "dispatch")  # runtime choices now: dropped


def upgrade_v1(flat: dict) -> dict:
    """A version-1 (flat) config dict in this version's layout."""
    flat = dict(flat)
    moe = {new: flat.pop(old) for old, new in V1_MOE_FIELDS.items() if old in flat}
    for name in V1_KERNEL_FIELDS:
        flat.pop(name, None)
    flat["moe"] = moe if moe.get("n_experts") is not None else None
    return flat


def config_diff(a: dict, b: dict, prefix="") -> dict:
    """{field: (a's value, b's value)} where two config dicts differ; nested fields as 'moe.top_k'."""
    diff = {}
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            diff |= config_diff(x, y, prefix=f"{prefix}{key}.")
        elif x != y:
            diff[prefix + key] = (x, y)
    return diff


def _refuse_unknown(cls, fields_: dict, source):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(fields_) - known)
    if unknown:
        hints = [f"{name!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(name, known, 1))
                 else repr(name) for name in unknown]
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {', '.join(hints)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
