"""Three ways to send tokens to their experts and bring the results back; same outputs
(sort: notebook 03; einsum and loop: notebook 05). `model.Kernels(dispatch=...)` picks one.

    einsum  dense one-hot dispatch and combine tensors (N, E, C), as in GShard / Mesh
            TensorFlow: simple and static-shaped, but memory grows as tokens x experts x capacity
    sort    sort kept assignments by expert, one grouped matmul pair, scatter-add back
    loop    one expert at a time over its own tokens (Hugging Face's Mixtral block does this)

All take x (N, C), a Routing and the Experts, and return (N, C). Dropped assignments
contribute nothing. `benchmarks/moe_dispatch.py` measures them; the package uses "sort".
"""

import torch

from .experts import Experts
from .router import Routing


def sort_by_expert(routing: Routing, n_experts: int):
    """Kept assignments grouped by expert, token order within a group.

    Returns token (M,) the token of each sorted row, gate (M,) its gate (differentiable), and
    counts (E,) rows per expert. (index_select rather than x[idx]: on CPU its backward is ~10x faster.)
    """
    k = routing.expert.size(1)
    assignment = routing.kept.reshape(-1).nonzero().squeeze(1)  # (M,) kept, into the (N*k) grid
    expert = routing.expert.reshape(-1).index_select(0, assignment)
    order = torch.argsort(expert, stable=True)  # group by expert, token order within a group
    assignment, expert = assignment.index_select(0, order), expert.index_select(0, order)
    token = assignment // k  # (M,) which token each sorted row comes from
    gate = routing.weights.reshape(-1).index_select(0, assignment)  # (M,)
    return token, gate, torch.bincount(expert, minlength=n_experts)


def combine(x, token, y, gate):
    """Add the gated expert outputs y (M, C) back onto their tokens: (N, C), zero where none."""
    weighted = (y.float() * gate[:, None]).to(x.dtype)  # the gate carries the router's gradient
    return torch.zeros_like(x).index_add(0, token, weighted)


def sort_dispatch(x, routing: Routing, experts: Experts):
    """Sort kept assignments by expert, run each expert on its slice, add gated outputs back."""
    token, gate, counts = sort_by_expert(routing, experts.n_experts)
    y = experts(x.index_select(0, token), counts)  # (M, C)
    return combine(x, token, y, gate)


def einsum_dispatch(x, routing: Routing, experts: Experts):
    """One-hot dispatch (N, E, C) and gate-weighted combine (N, E, C) tensors, einsums between."""
    N, k = routing.expert.shape
    E, cap = experts.n_experts, routing.capacity
    slot = routing.expert * cap + routing.position.clamp(0, max(cap - 1, 0))  # (N, k) into E*cap; dropped: weight 0
    kept = routing.kept.float()
    to_slots = torch.zeros(N, E * cap, device=x.device).scatter_add(1, slot, kept).view(N, E, cap)
    from_slots = torch.zeros(N, E * cap, device=x.device).scatter_add(1, slot, routing.weights * kept).view(N, E, cap)
    expert_in = torch.einsum("nec,nd->ecd", to_slots.to(x.dtype), x)  # (E, cap, C), empty slots zero
    h = torch.einsum("ecd,edh->ech", expert_in, experts.c_fc.to(x.dtype))
    if experts.b_fc is not None:
        h = h + experts.b_fc[:, None, :]
    y = torch.einsum("ech,ehd->ecd", experts.activate(h), experts.c_proj.to(x.dtype))
    if experts.b_proj is not None:
        y = y + experts.b_proj[:, None, :]
    return torch.einsum("nec,ecd->nd", from_slots, y.float()).to(x.dtype)


def loop_dispatch(x, routing: Routing, experts: Experts):
    """For each expert: find its kept assignments, run it on those tokens, add them back."""
    out = torch.zeros_like(x)
    for e in range(experts.n_experts):
        token, choice = torch.where((routing.expert == e) & routing.kept)
        if token.numel():
            y = experts.expert(e, x.index_select(0, token))
            out = out.index_add(0, token, (y.float() * routing.weights[token, choice, None]).to(x.dtype))
    return out


DISPATCH = {"sort": sort_dispatch, "einsum": einsum_dispatch, "loop": loop_dispatch}
