"""E feed-forward experts stored as stacked weights, run on tokens grouped by expert (notebook 03).

Weights are (E, C, H) and (E, H, C) tensors rather than E separate modules, so that one
grouped matrix multiply (`F.grouped_mm`, PyTorch >= 2.8) can run every expert on its own
contiguous slice of tokens. Where grouped_mm cannot run (PyTorch < 2.8; dtypes the backend
lacks, e.g. float64 on CPU; misaligned widths) the experts fall back to one matmul per expert: a
loop over experts, never over tokens. Under torch.compile the same computation is one custom
operator with its own backward (`expert_matmul`), which the compiler calls as it is.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def grouped_matmul(x, weight, counts):
    """Rows of x (M, K) in expert order, counts (E,) per expert, weight (E, K, N) -> (M, N)."""
    if torch.is_autocast_enabled(x.device.type):  # autocast does not cover grouped_mm: do as nn.Linear
        x = x.to(torch.get_autocast_dtype(x.device.type))
    weight = weight.to(x.dtype)
    if torch.compiler.is_compiling():
        return expert_matmul(x, weight, counts)  # one opaque operator to the compiler (below)
    # Eager: autograd through grouped_mm (or the per-expert matmuls) directly, without the
    # operator's Python dispatch on every call.
    return _ContiguousGrad.apply(matmul_by_expert(x, weight, counts))


def matmul_by_expert(x, weight, counts):
    """Each expert's rows of x (M, K) @ its weight (E, K, N) -> (M, N): one grouped_mm where the
    backend has it, one matmul per expert where not."""
    if _can_group(x, weight.size(2)):
        return F.grouped_mm(x, weight, offs=_slice_ends(counts))
    return per_expert_matmul(x, weight, counts)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's CPU backward rejects
    broadcast (stride-0) gradients such as the one `y.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


# Under torch.compile the grouped matmul is a custom operator: the compiler sees one opaque call with
# a known output shape, (M, N), instead of tracing into it. Traced, the per-expert fallback's split
# sizes are data (tokens per expert), which breaks the graph and compiles anew for each routing; and
# grouped_mm's traced form accepts bfloat16 only, while run as an operator it takes whatever the
# backend does (float32 on CPU).
@torch.library.custom_op("moe_tutorial::expert_matmul", mutates_args=())
def expert_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (M, K) rows grouped by expert, weight (E, K, N), counts (E,) -> (M, N): rows @ their expert."""
    return matmul_by_expert(x, weight, counts)


@torch.library.custom_op("moe_tutorial::expert_weight_grad", mutates_args=())
def expert_weight_grad(x: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each expert's x_e^T @ grad_e, for x (M, K) and grad (M, N) grouped by expert -> (E, K, N)."""
    if _can_group(x, grad.size(1)):
        return F.grouped_mm(x.t(), grad, offs=_slice_ends(counts))
    rows = counts.tolist()
    return torch.stack([a.t() @ b for a, b in zip(x.split(rows), grad.split(rows))])


@expert_matmul.register_fake
def _(x, weight, counts):
    return x.new_empty(x.size(0), weight.size(2))


@expert_weight_grad.register_fake
def _(x, grad, counts):
    return x.new_empty(counts.size(0), x.size(1), grad.size(1))


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _expert_matmul_backward(ctx, grad):
    """y_e = x_e @ W_e for every expert e: dx_e = dy_e @ W_e^T, dW_e = x_e^T @ dy_e."""
    x, weight, counts = ctx.saved_tensors
    grad = grad.contiguous()  # a broadcast gradient (from y.sum()) has stride 0, which grouped_mm rejects
    grad_x = expert_matmul(grad, weight.transpose(1, 2), counts) if ctx.needs_input_grad[0] else None
    grad_weight = expert_weight_grad(x, grad, counts) if ctx.needs_input_grad[1] else None
    return grad_x, grad_weight, None


expert_matmul.register_autograd(_expert_matmul_backward, setup_context=_save_inputs)


def _can_group(x, out_width) -> bool:
    """grouped_mm can multiply x (M, K) into out_width columns: the backend has it for this dtype,
    and rows are 16-byte aligned (e.g. widths divisible by 4 in fp32)."""
    row_bytes = (x.size(1) * x.element_size(), out_width * x.element_size())
    return grouped_mm_supported(x.device.type, x.dtype) and all(b % 16 == 0 for b in row_bytes)


def _slice_ends(counts):
    """grouped_mm's offs: the end row of each expert's slice, int32."""
    return counts.cumsum(0).to(torch.int32)


@functools.cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether F.grouped_mm runs forward and backward for this device and dtype: asked of the
    backend once with a tiny problem, since its dtype support differs by device and version."""
    if not HAS_GROUPED_MM:
        return False
    try:  # the answer must not depend on the caller's mode: no_grad, inference_mode, autocast
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            return _probe_grouped_mm(device_type, dtype)
    except (RuntimeError, NotImplementedError):
        return False


def _probe_grouped_mm(device_type, dtype) -> bool:
    x = torch.zeros(4, 8, device=device_type, dtype=dtype, requires_grad=True)
    w = torch.zeros(2, 8, 8, device=device_type, dtype=dtype, requires_grad=True)
    y = F.grouped_mm(x, w, offs=torch.tensor([2, 4], device=device_type, dtype=torch.int32))
    y.backward(torch.ones_like(y))
    return True


def per_expert_matmul(x, weight, counts):
    slices = x.split(counts.tolist())
    return torch.cat([rows @ w.to(x.dtype) for rows, w in zip(slices, weight)])


class Experts(nn.Module):
    """E two-layer MLPs: GELU (GPT-2) or SwiGLU (notebook 07), whose c_fc holds [gate | up]."""

    def __init__(self, n_experts, n_embd, hidden, bias=False, gelu_approximate="none", activation="gelu"):
        super().__init__()
        self.gelu_approximate = gelu_approximate  # "tanh" for GPT-2's weights
        self.activation = activation  # "gelu" or "swiglu", as in model.MLP
        fc_width = 2 * hidden if activation == "swiglu" else hidden
        self.c_fc = nn.Parameter(torch.empty(n_experts, n_embd, fc_width))  # (E, C, H), or (E, C, 2H) for SwiGLU
        self.c_proj = nn.Parameter(torch.empty(n_experts, hidden, n_embd))  # (E, H, C)
        self.b_fc = nn.Parameter(torch.zeros(n_experts, fc_width)) if bias else None
        self.b_proj = nn.Parameter(torch.zeros(n_experts, n_embd)) if bias else None
        self.reset_parameters(std=0.02, proj_std=0.02)

    @property
    def n_experts(self):
        return self.c_fc.size(0)

    @torch.no_grad()
    def reset_parameters(self, std, proj_std):
        nn.init.normal_(self.c_fc, std=std)
        nn.init.normal_(self.c_proj, std=proj_std)
        for bias in (self.b_fc, self.b_proj):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(self, x, counts):
        """x (M, C) with rows grouped by expert, counts (E,) rows per expert -> (M, C)."""
        h = grouped_matmul(x, self.c_fc, counts)  # (M, H)
        if self.b_fc is not None or self.b_proj is not None:
            expert_of_row = torch.repeat_interleave(torch.arange(self.n_experts, device=x.device), counts)
        if self.b_fc is not None:
            h = h + self.b_fc[expert_of_row]
        y = grouped_matmul(self.activate(h), self.c_proj, counts)  # (M, C)
        if self.b_proj is not None:
            y = y + self.b_proj[expert_of_row]
        return y

    def expert(self, i, x):
        """Expert i alone on x (..., C): the plain two-layer MLP, for tests and explanations."""
        h = x @ self.c_fc[i] + (self.b_fc[i] if self.b_fc is not None else 0)
        return self.activate(h) @ self.c_proj[i] + (self.b_proj[i] if self.b_proj is not None else 0)

    def activate(self, h):  # (..., H) -> (..., H); SwiGLU: (..., 2H) -> (..., H)
        return ffn_activation(h, self.activation, self.gelu_approximate)


def ffn_activation(h, activation: str, gelu_approximate: str = "none"):
    """The feed-forward nonlinearity of the dense MLP and of every expert: GELU on h (..., H), or
    SwiGLU (Shazeer 2020) on h = [gate | up] (..., 2H) -> silu(gate) * up (..., H), the gate half
    deciding, per hidden unit, how much of the up half passes."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate=gelu_approximate)
