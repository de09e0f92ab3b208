"""The experts sweep's grid: the MoE variants `benchmarks/moe_scaling.py` trains on the char recipe
and notebook 04 reads back, one name for each.

Every variant keeps the dense `char` model's *active* compute per token: a token passes through
experts whose hidden widths add up to the dense MLP's 4C (C = 128). Top-1 variants use full-width
experts; fine-grained ones (DeepSeekMoE) split each expert into m narrower ones and route to m x
more; shared-expert variants turn one of the k active experts into an always-on one.
"""

from .config import MoEConfig

# MoEConfig fields of the char model's MoE layers (dense hidden 4C = 512), in every block.
VARIANTS = {
    "dense": {},
    "top-1 E=4": dict(n_experts=4, top_k=1),
    "top-1 E=8": dict(n_experts=8, top_k=1),
    "top-1 E=16": dict(n_experts=16, top_k=1),
    "top-1 E=32": dict(n_experts=32, top_k=1),
    "E=16 k=2 (2C)": dict(n_experts=16, top_k=2, expert_hidden=256),
    "E=32 k=4 (C)": dict(n_experts=32, top_k=4, expert_hidden=128),
    "E=64 k=8 (C/2)": dict(n_experts=64, top_k=8, expert_hidden=64),
    "E=16 k=1 (2C) + shared": dict(n_experts=16, top_k=1, expert_hidden=256, n_shared_experts=1),
    "E=32 k=3 (C) + shared": dict(n_experts=32, top_k=3, expert_hidden=128, n_shared_experts=1),
    "E=64 k=7 (C/2) + shared": dict(n_experts=64, top_k=7, expert_hidden=64, n_shared_experts=1),
}
# A derived variant is a grid variant's name plus one of these suffixes (one change to it).
EVERY_OTHER = ", every other block"
AUX_FREE = ", aux-loss-free"

# The grid's three lines through expert count (the plot's x axis), same compute per token.
FAMILIES = {
    "top-1, full-width experts": ["top-1 E=4", "top-1 E=8", "top-1 E=16", "top-1 E=32"],
    "fine-grained top-k (width 4C/k)": ["E=16 k=2 (2C)", "E=32 k=4 (C)", "E=64 k=8 (C/2)"],
    "fine-grained + 1 shared": ["E=16 k=1 (2C) + shared", "E=32 k=3 (C) + shared", "E=64 k=7 (C/2) + shared"],
}


def base_variant(name: str) -> str:
    """The grid variant a name starts from: "<variant>, every other block" -> "<variant>"."""
    base = name.removesuffix(EVERY_OTHER).removesuffix(AUX_FREE)
    if base not in VARIANTS:
        raise ValueError(f"Unknown sweep variant {name!r}: use one of {sorted(VARIANTS)}, optionally followed by "
                         f"{EVERY_OTHER!r} or {AUX_FREE!r}")
    return base


def moe_config(name: str) -> MoEConfig | None:
    """A variant's MoE layers (None: dense)."""
    fields = dict(VARIANTS[base_variant(name)])
    if not fields:
        if name != "dense":
            raise ValueError(f"{name!r}: dense has no MoE layers to change; use 'dense'")
        return None
    if name.endswith(EVERY_OTHER):
        fields["every"] = 2
    if name.endswith(AUX_FREE):
        fields.update(aux_loss_coef=0.0, bias_update_rate=1e-3)  # DeepSeek-V3's balancing instead
    return MoEConfig(**fields)
