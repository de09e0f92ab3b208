"""Every exercise in notebooks/ has a solution and a check, and every check can fail."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# importing each chapter registers its checks in CHECKS
import moe_tutorial.exercises.ch01
import moe_tutorial.exercises.ch02
import moe_tutorial.exercises.ch03
import moe_tutorial.exercises.ch04
import moe_tutorial.exercises.ch05
import moe_tutorial.exercises.ch06
import moe_tutorial.exercises.ch07
import moe_tutorial.exercises.ch08  # noqa: F401
from moe_tutorial.exercises import CHECKS
from moe_tutorial.router import positions_in_expert as _PIE

ROOT = Path(__file__).resolve().parent.parent
CHECK_CALL = re.compile(r"check_(\w+)\((\w+)\)")


def notebook_cells(path):
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def exercises_in(path):
    """{exercise name: function name} for each `check_<name>(<fn>)` call in a notebook."""
    return {m.group(1): m.group(2) for src in notebook_cells(path) for m in CHECK_CALL.finditer(src)}


def solution_namespace(notebook):
    """Run the solutions notebook's cells (they define the solved functions) in one namespace."""
    namespace = {}
    for src in notebook_cells(notebook):
        if "NBVAL_SKIP" not in src:
            exec(compile(src, str(notebook), "exec"), namespace)
    return namespace


# Wrong answers for each exercise: each check must reject every one of them.
def _normalised_exp(x, dim=-1):  # a stable softmax written out: the wrong answers below fail for their own mistake
    e = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def _masked(scores):
    T = scores.size(-1)
    return scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))


def _no_mask(scores):
    return _normalised_exp(scores)


def _mask_no_softmax(scores):
    T = scores.size(-1)
    return scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), 0.0)


def _softmax_wrong_dim(scores):
    return _normalised_exp(_masked(scores), dim=-2)


def _weights_unstable(scores):  # no maximum subtracted: exp(1000) is inf
    e = torch.exp(_masked(scores))
    return e / e.sum(dim=-1, keepdim=True)


def _weights_global_max(scores):  # one maximum for the whole tensor: rows far below it underflow to 0 / 0
    e = torch.exp(_masked(scores) - scores.max())
    return e / e.sum(dim=-1, keepdim=True)


def _weights_f_softmax(scores):
    return F.softmax(_masked(scores), dim=-1)


def _weights_torch_softmax(scores):
    return torch.softmax(_masked(scores), dim=-1)


def _weights_softmax_method(scores):
    return _masked(scores).softmax(dim=-1)


def _weights_log_softmax(scores):
    return _masked(scores).log_softmax(dim=-1).exp()


def _weights_softmax_in_helper(scores):  # the library softmax one call away
    return _weights_f_softmax(scores)


def _weights_logsumexp(scores):  # exp(s - logsumexp(s)): a library softmax by another name
    s = _masked(scores)
    return torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True))


def _weights_logsumexp_method(scores):  # the same through Tensor.logsumexp
    s = _masked(scores)
    return (s - s.logsumexp(dim=-1, keepdim=True)).exp()


def _attend(q, k, v, scale, causal=True):  # written out: the wrong answers below must fail for their own mistake
    scores = q @ k.transpose(-2, -1) * scale
    if causal:
        T = scores.size(-1)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return F.softmax(scores, dim=-1) @ v


def _head_unscaled(x, key, query, value):
    return _attend(query(x), key(x), value(x), scale=1.0)


def _head_not_causal(x, key, query, value):
    return _attend(query(x), key(x), value(x), scale=key.out_features ** -0.5, causal=False)


def _head_swapped(x, key, query, value):
    return _attend(key(x), query(x), value(x), scale=key.out_features ** -0.5)


def _head_sdpa(x, key, query, value):  # right numbers, but the library does the exercise
    return F.scaled_dot_product_attention(query(x), key(x), value(x), is_causal=True)


def _head_naive_attention(x, key, query, value):  # right numbers, but the package does the exercise
    from moe_tutorial.attention import naive_attention

    return naive_attention(query(x), key(x), value(x))


def _head_package_attention(x, key, query, value):  # the package's entry point, causal by default
    import moe_tutorial.attention

    return moe_tutorial.attention.attention(query(x), key(x), value(x))


def _probs_no_temperature(logits, temperature, top_k):
    return F.softmax(logits, dim=-1)


def _probs_times_temperature(logits, temperature, top_k):
    return F.softmax(logits * temperature, dim=-1)


def _probs_ignores_top_k(logits, temperature, top_k):
    return F.softmax(logits / temperature, dim=-1)


def _probs_filter_logits(logits, temperature, top_k):  # right numbers, but the package keeps the top k
    from moe_tutorial.sampling import filter_logits

    return F.softmax(filter_logits(logits / temperature, top_k), dim=-1)


# notebook 02
def _merge_no_rescale(a, b):
    return torch.maximum(a[0], b[0]), a[1] + b[1], a[2] + b[2]


def _merge_min(a, b):
    m = torch.minimum(a[0], b[0])
    sa, sb = torch.exp(a[0] - m), torch.exp(b[0] - m)
    return m, a[1] * sa + b[1] * sb, a[2] * sa[:, None] + b[2] * sb[:, None]


def _merge_nan_when_empty(a, b):  # right for non-empty states, NaN when both are empty
    m = torch.maximum(a[0], b[0])
    sa, sb = torch.exp(a[0] - m), torch.exp(b[0] - m)
    return m, a[1] * sa + b[1] * sb, a[2] * sa[:, None] + b[2] * sb[:, None]


def _attend_no_online(q, k, v, block_k):  # softmax per block, no running max/sum: wrong for >1 block
    outs, lse = [], torch.full((q.size(0),), float("-inf"), dtype=q.dtype)
    for s in range(0, k.size(0), block_k):
        scores = q @ k[s:s + block_k].T / q.size(-1) ** 0.5
        outs.append(F.softmax(scores, -1) @ v[s:s + block_k])
        lse = torch.logaddexp(lse, torch.logsumexp(scores, -1))  # the logsumexp is right: only the output is wrong
    return sum(outs) / len(outs), lse


def _attend_full_softmax(q, k, v, block_k):  # right numbers, but ignores block_k: no tiling at all
    s = q @ k.T / q.size(-1) ** 0.5
    return F.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def _attend_full_transposed(q, k, v, block_k):  # the whole (T, bq) score matrix, built the other way round
    st = k @ q.T / q.size(-1) ** 0.5
    return (v.T @ st.softmax(0)).T, torch.logsumexp(st, 0)


def _attend_row_by_row(q, k, v, block_k):  # one query row at a time, each against all keys: no key blocks
    outs, lses = [], []
    for i in range(q.size(0)):
        s = q[i:i + 1] @ k.T / q.size(-1) ** 0.5  # (1, T)
        outs.append(F.softmax(s, -1) @ v)
        lses.append(torch.logsumexp(s, -1))
    return torch.cat(outs), torch.cat(lses)


def _attend_row_by_row_elementwise(q, k, v, block_k):  # the same, with the scores as a product and a sum
    outs, lses = [], []
    for i in range(q.size(0)):
        s = (q[i] * k).sum(-1) / q.size(-1) ** 0.5  # (T,)
        outs.append(F.softmax(s, -1) @ v)
        lses.append(torch.logsumexp(s, -1))
    return torch.stack(outs), torch.stack(lses)


def _attend_two_pass(q, k, v, block_k):  # the maximum over all key blocks first, then the sums: two passes
    scale = q.size(-1) ** -0.5
    m = torch.full((q.size(0),), float("-inf"), dtype=q.dtype)
    for s in range(0, k.size(0), block_k):
        m = torch.maximum(m, (q @ k[s:s + block_k].T * scale).amax(-1))
    l, acc = torch.zeros_like(m), torch.zeros_like(q)
    for s in range(0, k.size(0), block_k):
        p = torch.exp(q @ k[s:s + block_k].T * scale - m[:, None])
        l, acc = l + p.sum(-1), acc + p @ v[s:s + block_k]
    return acc / l[:, None], m + torch.log(l)


def _attend_two_pass_transposed(q, k, v, block_k):  # two passes, the scores computed as k_blk @ q^T
    scale = q.size(-1) ** -0.5
    m = torch.full((q.size(0),), float("-inf"), dtype=q.dtype)
    for s in range(0, k.size(0), block_k):
        m = torch.maximum(m, (k[s:s + block_k] @ (q * scale).T).amax(0))
    l, acc = torch.zeros_like(m), torch.zeros_like(q)
    for s in range(0, k.size(0), block_k):
        p = torch.exp(k[s:s + block_k] @ (q * scale).T - m).T
        l, acc = l + p.sum(-1), acc + p @ v[s:s + block_k]
    return acc / l[:, None], m + torch.log(l)


def _attend_sdpa(q, k, v, block_k):
    s = q @ k.T / q.size(-1) ** 0.5
    return F.scaled_dot_product_attention(q[None], k[None], v[None])[0], torch.logsumexp(s, -1)


def _attend_package_forward(q, k, v, block_k):  # right numbers, one pass, but the package does the exercise
    from moe_tutorial.attention import flash_attention_forward

    out, lse = flash_attention_forward(q[None, None], k[None, None], v[None, None], causal=False,
                                       block_q=q.size(0), block_k=block_k)
    return out[0, 0], lse[0, 0]


def _attend_package_flash(q, k, v, block_k):  # the package's autograd function, the logsumexp block by block
    from moe_tutorial.attention import flash_attention

    lse = torch.full((q.size(0),), float("-inf"), dtype=q.dtype)
    for s in range(0, k.size(0), block_k):
        lse = torch.logaddexp(lse, torch.logsumexp(q @ k[s:s + block_k].T / q.size(-1) ** 0.5, -1))
    return flash_attention(q[None, None], k[None, None], v[None, None], False, q.size(0), block_k)[0, 0], lse


def _attend_two_pass_batched(q, k, v, block_k):  # two passes, the scores from batched (3-D and 4-D) matmuls
    scale = q.size(-1) ** -0.5
    m = torch.full((q.size(0),), float("-inf"), dtype=q.dtype)
    for s in range(0, k.size(0), block_k):
        m = torch.maximum(m, torch.bmm(q[None], k[s:s + block_k].T[None])[0].amax(-1) * scale)
    l, acc = torch.zeros_like(m), torch.zeros_like(q)
    for s in range(0, k.size(0), block_k):
        p = torch.exp(q[None, None] @ k[None, None, s:s + block_k].transpose(-2, -1) * scale - m[:, None])[0, 0]
        l, acc = l + p.sum(-1), acc + p @ v[s:s + block_k]
    return acc / l[:, None], m + torch.log(l)


def _blocks_library(q_start, q_end, T, block_k):
    from moe_tutorial.attention import key_blocks

    return list(key_blocks(q_start, q_end, T, block_k, causal=True))


def _attend_unscaled(q, k, v, block_k):
    s = q @ k.T
    return F.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def _blocks_all(q_start, q_end, T, block_k):
    return [(s, min(s + block_k, T), True) for s in range(0, T, block_k)]


def _blocks_no_mask_flag(q_start, q_end, T, block_k):
    return [(s, min(s + block_k, T), False) for s in range(0, T, block_k) if s <= q_end - 1]


def _tile(q, k, v, d_out, lse, delta, future, probs_of=None, subtract_delta=True, grad_scale=None, dv_of=None):
    """One backward tile with one named mistake (the defaults give the right answer)."""
    scale = q.size(-1) ** -0.5
    s = q @ k.T * scale
    if future is not None:
        s = s.masked_fill(future, float("-inf"))
    p = probs_of(s, lse) if probs_of else torch.exp(s - lse[:, None])
    ds = p * (d_out @ v.T - (delta[:, None] if subtract_delta else 0.0))
    g = scale if grad_scale is None else grad_scale
    return ds @ k * g, ds.T @ q * g, dv_of(p, d_out) if dv_of else p.T @ d_out


def _tile_no_delta(*args):  # dS = P * dP: forgets the softmax Jacobian's D_i
    return _tile(*args, subtract_delta=False)


def _tile_unnormalised(*args):  # P = exp(S), never divided by the row's sum of exponentials
    return _tile(*args, probs_of=lambda s, lse: torch.exp(s))


def _tile_softmax_per_tile(*args):  # P renormalised over the tile alone instead of all keys
    return _tile(*args, probs_of=lambda s, lse: F.softmax(s, dim=-1))


def _tile_unscaled(*args):  # dQ, dK without the 1/sqrt(D) of S = Q K^T / sqrt(D)
    return _tile(*args, grad_scale=1.0)


def _tile_transposed(*args):  # dV = P dO instead of P^T dO
    return _tile(*args, dv_of=lambda p, d_out: p @ d_out)


def _tile_ignores_mask(q, k, v, d_out, lse, delta, future):  # the causal tile's future keys get weight
    return _tile(q, k, v, d_out, lse, delta, None)


# notebook 03
def _kept_all(expert, n_experts, capacity):
    return torch.ones_like(expert, dtype=torch.bool)


def _kept_latest(expert, n_experts, capacity):  # keeps the last tokens instead of the first
    flipped = expert.flip(0)
    one_hot = F.one_hot(flipped, n_experts)
    pos = (one_hot.cumsum(0) * one_hot).sum(1) - 1
    return (pos < capacity).flip(0)


def _kept_library(expert, n_experts, capacity):
    from moe_tutorial.router import positions_in_expert

    return positions_in_expert(expert[:, None], n_experts)[:, 0] < capacity


def _lb_switch_library(probs):
    from moe_tutorial.router import load_balancing_loss

    return load_balancing_loss(probs, probs.argmax(-1))


def _lb_layers_argmax(probs, first):  # ignores the given first choices
    return sum(_switch_loss(p, p.argmax(-1)) for p in probs)


def _lb_soft_f(probs):
    return probs.size(1) * (probs.mean(0) * probs.mean(0)).sum()


def _lb_no_scale(probs):
    f = torch.bincount(probs.argmax(-1), minlength=probs.size(1)).float() / probs.size(0)
    return (f * probs.mean(0)).sum()


def _zg_mean_sq_logits(logits):  # the gradient of mean(l^2)
    return 2 * logits / logits.size(0)


def _zg_no_mean(logits):
    return 2 * torch.logsumexp(logits, -1, keepdim=True) * F.softmax(logits, -1)


def _zg_no_softmax(logits):
    return (2 * torch.logsumexp(logits, -1, keepdim=True) / logits.size(0)).expand_as(logits)


def _zg_naive(logits):  # right formula, exp written out: overflows
    e = torch.exp(logits)
    return 2 * torch.log(e.sum(-1, keepdim=True)) * e / e.sum(-1, keepdim=True) / logits.size(0)


def _zg_autograd(logits):
    logits = logits.detach().requires_grad_()
    with torch.enable_grad():
        torch.logsumexp(logits, -1).square().mean().backward()
    return logits.grad


# notebook 04
def _aux_free(probs, bias, k, rate, gates_from=None, load_of=None, step=None):
    expert = (probs + bias).topk(k, dim=-1).indices
    gate = (probs if gates_from is None else gates_from(probs, bias)).gather(1, expert)
    counted = expert if load_of is None else load_of(probs, expert, k)
    load = torch.bincount(counted.reshape(-1), minlength=probs.size(1)).float()
    move = torch.sign(load.mean() - load) if step is None else step(load)
    return expert, gate / gate.sum(-1, keepdim=True), bias + rate * move


def _aux_free_biased_gates(probs, bias, k, rate):
    return _aux_free(probs, bias, k, rate, gates_from=lambda p, b: p + b)


def _aux_free_unnormalised(probs, bias, k, rate):
    expert, _, new_bias = _aux_free(probs, bias, k, rate)
    return expert, probs.gather(1, expert), new_bias


def _aux_free_unbiased_load(probs, bias, k, rate):
    return _aux_free(probs, bias, k, rate, load_of=lambda p, e, k: p.topk(k, dim=-1).indices)


def _aux_free_first_choices(probs, bias, k, rate):
    return _aux_free(probs, bias, k, rate, load_of=lambda p, e, k: e[:, 0])


def _aux_free_reversed(probs, bias, k, rate):
    return _aux_free(probs, bias, k, rate, step=lambda load: torch.sign(load - load.mean()))


def _aux_free_proportional(probs, bias, k, rate):
    return _aux_free(probs, bias, k, rate, step=lambda load: load.mean() - load)


def _aux_free_no_bias(probs, bias, k, rate):
    return _aux_free(probs, torch.zeros_like(bias), k, rate)


def _mask_with_dropped(expert, position, kept, n_experts, capacity):
    mask = torch.zeros(expert.size(0), n_experts, capacity)
    for n in range(expert.size(0)):
        for j in range(expert.size(1)):
            mask[n, expert[n, j], min(position[n, j], capacity - 1)] = 1.0
    return mask


def _slots_token_major(expert, n_experts):  # each token's choices, then the next token's
    flat = expert.reshape(-1)
    position = (F.one_hot(flat, n_experts).cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)
    return position.view(expert.shape)


def _slots_library(expert, n_experts):
    from moe_tutorial.router import positions_in_expert

    return positions_in_expert(expert, n_experts)


def _slots_library_renamed(expert, n_experts):  # the package's function under another name
    return _PIE(expert, n_experts)


def _slots_two_choices_only(expert, n_experts):  # right for k = 2 only
    counts, position = [0] * n_experts, torch.zeros_like(expert)
    for j in range(min(2, expert.size(1))):
        for n in range(expert.size(0)):
            e = int(expert[n, j])
            position[n, j], counts[e] = counts[e], counts[e] + 1
    return position


def _switch_loss(p, f):
    E = p.size(1)
    return E * (torch.bincount(f, minlength=E).float() / len(f) * p.mean(0)).sum()


def _lb_concatenated(probs, first):  # transformers' load_balancing_loss_func: all layers' tokens as one
    return _switch_loss(torch.cat(probs), torch.cat(first))


def _lb_mean_over_layers(probs, first):
    return sum(_switch_loss(p, f) for p, f in zip(probs, first)) / len(probs)


def _lb_library(probs, first):  # right, but the package's function does the exercise
    from moe_tutorial.router import load_balancing_loss

    return sum(load_balancing_loss(p, f) for p, f in zip(probs, first))


def _ec_token_choice(probs, capacity):  # each token picks experts
    kept = torch.zeros_like(probs, dtype=torch.bool)
    kept[torch.arange(probs.size(0))[:, None], probs.topk(capacity, dim=1).indices] = True
    return kept


def _ec_global_top(probs, capacity):  # the C*E highest scores of the whole table
    threshold = probs.flatten().topk(capacity * probs.size(1)).values[-1]
    return probs >= threshold


# notebook 05
def _params(L, C, V, T, tied=True, position=True, biases=True):
    per_block = 12 * C * C + (13 * C if biases else 0)  # attention 4C^2 + MLP 8C^2, biases and norms
    return L * per_block + V * C * (1 if tied else 2) + (T * C if position else 0) + (2 * C if biases else C)


def _params_untied(L, C, V, T):
    return _params(L, C, V, T, tied=False)


def _params_no_position(L, C, V, T):
    return _params(L, C, V, T, position=False)


def _params_no_biases(L, C, V, T):
    return _params(L, C, V, T, biases=False)


def _upcycle_no_transpose(mlp, n_experts):
    return (mlp.c_fc.weight.detach().clone().expand(n_experts, -1, -1),
            mlp.c_proj.weight.detach().clone().expand(n_experts, -1, -1))


def _upcycle_shared_memory(mlp, n_experts):
    return (mlp.c_fc.weight.data.t().expand(n_experts, -1, -1),
            mlp.c_proj.weight.data.t().expand(n_experts, -1, -1))


def _params_model_info(L, C, V, T):
    from moe_tutorial.config import GPTConfig
    from moe_tutorial.costs import model_info

    return model_info(GPTConfig(n_layer=L, n_embd=C, vocab_size=V, block_size=T, n_head=1, bias=True)).total_params


def _decode_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _moe_private_parts(m, attention):
    from moe_tutorial import serving

    parts = serving._parts(m)
    expert = parts.pop("expert")
    always = sum(parts.values())
    return always + m.n_moe_layers * m.n_experts * expert, always + m.n_moe_layers * m.top_k * expert


def _decode_top_left_mask(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _decode_unscaled(q, k, v):
    return F.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def _moe_params(m, attention, all_active=False, shared=True, dense_layers=True, tied=True, routers=True, norms=True):
    C, swiglu = m.hidden_size, 3 * m.hidden_size * m.expert_hidden
    moe_layers = m.n_moe_layers if dense_layers else m.n_layers
    always = m.vocab_size * C * (1 if m.tie_embeddings and tied else 2) + m.n_layers * attention
    always += (2 * m.n_layers + 1) * C * norms + (m.n_dense_layers * 3 * C * m.dense_hidden) * dense_layers
    always += moe_layers * (m.n_experts * C * routers + m.n_shared_experts * swiglu * shared)
    routed = moe_layers * swiglu
    total = always + m.n_experts * routed
    return total, total if all_active else always + m.top_k * routed


def _moe_wrong(**mistake):
    """A published-MoE count with one mistake, named after it."""
    def wrong(m, attention):
        return _moe_params(m, attention, **mistake)

    wrong.__name__ = "_moe_" + "_".join(f"{key}_{value}" for key, value in mistake.items())
    return wrong


def _moe_library(m, attention):
    from moe_tutorial.serving import parameter_counts

    return parameter_counts(m)


# notebook 06
def _splits_per_expert(expert, n_experts, world_size):
    return torch.bincount(expert, minlength=n_experts).tolist()


def _splits_even(expert, n_experts, world_size):
    return [len(expert) // world_size] * world_size


def _volume_library(*args, **kwargs):
    from moe_tutorial.distributed import all_to_all_bytes

    return all_to_all_bytes(*args, **kwargs)


def _volume_one_way(tokens, n_embd, top_k, world_size, nbytes):
    return tokens * top_k * (world_size - 1) / world_size * n_embd * nbytes


def _volume_all_rows(tokens, n_embd, top_k, world_size, nbytes):
    return 2 * tokens * top_k * n_embd * nbytes


# notebook 07
def _rope_correct(x, start, theta):
    from moe_tutorial.rope import RotaryEmbedding, apply_rope

    return apply_rope(x, *RotaryEmbedding(x.size(-1), start + x.size(-2), theta)(start, x.size(-2)))


def _rope_from_zero(x, start, theta):
    return _rope_correct(x, 0, theta)


def _rope_interleaved(x, start, theta):
    from moe_tutorial.exercises.ch07 import interleaved_rope

    return interleaved_rope(x, start, theta)


def _rope_backwards(x, start, theta):  # turns the other way: lengths kept, angles wrong
    from moe_tutorial.rope import RotaryEmbedding, rotate_half

    cos, sin = RotaryEmbedding(x.size(-1), start + x.size(-2), theta)(start, x.size(-2))
    return x * cos - rotate_half(x) * sin


def _rope_fixed_theta(x, start, theta):
    return _rope_correct(x, start, 10000.0)


def _kv_tiled(kv, n_rep):
    return kv.repeat(1, n_rep, 1, 1)


def _kv_unchanged(kv, n_rep):
    return kv


def _kv_time_scrambled(kv, n_rep):  # repeats along the wrong axis, then reshapes: heads right, positions wrong
    B, KV, T, D = kv.shape
    return kv[:, :, :, None].expand(B, KV, T, n_rep, D).reshape(B, KV * n_rep, T, D)


def _sigmoid_bias_inside(logits, bias, top_k, scaling):  # sigmoid(logits + bias) selects other experts
    experts = torch.sigmoid(logits + bias).topk(top_k, dim=-1).indices
    weights = torch.sigmoid(logits).gather(1, experts)
    return experts, scaling * weights / weights.sum(-1, keepdim=True)


def _sigmoid_unbiased_choice(logits, bias, top_k, scaling):
    s = torch.sigmoid(logits)
    w, e = s.topk(top_k, dim=-1)
    return e, scaling * w / w.sum(-1, keepdim=True)


def _sigmoid_biased_weights(logits, bias, top_k, scaling):
    b = torch.sigmoid(logits) + bias
    w, e = b.topk(top_k, dim=-1)
    return e, scaling * w / w.sum(-1, keepdim=True)


def _sigmoid_unscaled(logits, bias, top_k, scaling):
    s = torch.sigmoid(logits)
    e = (s + bias).topk(top_k, dim=-1).indices
    w = s.gather(1, e)
    return e, w / w.sum(-1, keepdim=True)


def _sigmoid_unnormalised(logits, bias, top_k, scaling):
    s = torch.sigmoid(logits)
    e = (s + bias).topk(top_k, dim=-1).indices
    return e, scaling * s.gather(1, e)


def _softmax_instead(logits, bias, top_k, scaling):
    p = F.softmax(logits, -1)
    e = (p + bias).topk(top_k, dim=-1).indices
    w = p.gather(1, e)
    return e, scaling * w / w.sum(-1, keepdim=True)


# notebook 08
def _load_first_choice_only(expert, n_experts):
    counts = torch.bincount(expert[:, 0], minlength=n_experts).float()
    return counts / counts.sum()


def _load_counts(expert, n_experts):
    return torch.bincount(expert.reshape(-1), minlength=n_experts).float()


def _load_per_token(expert, n_experts):  # divides by N instead of N * k: shares sum to k
    return torch.bincount(expert.reshape(-1), minlength=n_experts).float() / expert.size(0)


def _consistency_global_expert(token_ids, expert):  # one most common expert for all tokens
    return (torch.bincount(expert).max() / len(expert)).item()


def _consistency_per_id_mean(token_ids, expert):  # averages over ids, not tokens
    shares = []
    for t in token_ids.unique():
        e = expert[token_ids == t]
        shares.append(torch.bincount(e).max().item() / len(e))
    return sum(shares) / len(shares)


def _consistency_library(token_ids, expert):
    from moe_tutorial.analysis import token_consistency
    return token_consistency(token_ids, expert)


def _load_library(expert, n_experts):
    from moe_tutorial.analysis import assignment_share
    from moe_tutorial.exercises.ch08 import _routing
    return assignment_share(_routing(expert, n_experts))


def _norm_one_rank(shards, replicated):
    return (shards[0] + replicated) ** 0.5


def _norm_replicated_per_rank(shards, replicated):
    return (sum(shards) + len(shards) * replicated) ** 0.5


def _norm_sum_of_rank_norms(shards, replicated):
    return sum((s + replicated) ** 0.5 for s in shards)


def _norm_sum_of_norms(shards, replicated):
    return replicated ** 0.5 + sum(s ** 0.5 for s in shards)


def _mla_keys_built(q, c_kv, w_uk, w_uv, scale):
    keys, values = c_kv @ w_uk.transpose(1, 2), c_kv @ w_uv.transpose(1, 2)  # (H, S, nope), (H, S, v)
    probs = torch.softmax((keys @ q[:, :, None]).squeeze(-1) * scale, dim=-1)
    return (probs[:, None] @ values).squeeze(1)


def _mla_values_built(q, c_kv, w_uk, w_uv, scale):
    probs = torch.softmax(torch.einsum("hd,hdr,sr->hs", q, w_uk, c_kv) * scale, dim=-1)
    values = c_kv @ w_uv.transpose(1, 2)  # (H, S, v)
    return (probs[:, None] @ values).squeeze(1)


def _mla_one_einsum(q, c_kv, w_uk, w_uv, scale):  # einsum contracts left to right: (S, H, nope) inside
    probs = torch.softmax(torch.einsum("sr,hdr,hd->hs", c_kv, w_uk, q) * scale, dim=-1)
    return torch.einsum("hs,sr,hvr->hv", probs, c_kv, w_uv)


def _mla_unscaled(q, c_kv, w_uk, w_uv, scale):
    probs = torch.softmax(torch.einsum("hd,hdr,sr->hs", q, w_uk, c_kv), dim=-1)
    return torch.einsum("hs,sr,hvr->hv", probs, c_kv, w_uv)


def _mla_softmax_over_heads(q, c_kv, w_uk, w_uv, scale):
    probs = torch.softmax(torch.einsum("hd,hdr,sr->hs", q, w_uk, c_kv) * scale, dim=0)
    return torch.einsum("hs,sr,hvr->hv", probs, c_kv, w_uv)


def _mla_no_value_projection(q, c_kv, w_uk, w_uv, scale):
    probs = torch.softmax(torch.einsum("hd,hdr,sr->hs", q, w_uk, c_kv) * scale, dim=-1)
    return probs @ c_kv  # (H, r): the latent, not the value


def _unsolved(*args):
    raise NotImplementedError


WRONG_ANSWERS = {
    "mla_absorbed": [_mla_keys_built, _mla_values_built, _mla_one_einsum, _mla_unscaled, _mla_softmax_over_heads,
                     _mla_no_value_projection],
    "global_grad_norm": [_norm_one_rank, _norm_replicated_per_rank, _norm_sum_of_rank_norms, _norm_sum_of_norms],
    "expert_load": [_load_first_choice_only, _load_counts, _load_per_token, _load_library],
    "token_consistency": [_consistency_global_expert, _consistency_per_id_mean, _consistency_library],
    "rope": [_rope_from_zero, _rope_interleaved, _rope_backwards, _rope_fixed_theta],
    "repeat_kv": [_kv_tiled, _kv_unchanged, _kv_time_scrambled],
    "sigmoid_topk": [_sigmoid_bias_inside, _sigmoid_unbiased_choice, _sigmoid_biased_weights, _sigmoid_unscaled,
                     _sigmoid_unnormalised, _softmax_instead],
    "causal_attention_weights": [_no_mask, _mask_no_softmax, _softmax_wrong_dim, lambda s: s[:, :2], _weights_unstable,
                                 _weights_global_max, _weights_f_softmax, _weights_torch_softmax,
                                 _weights_softmax_method, _weights_log_softmax, _weights_softmax_in_helper,
                                 _weights_logsumexp, _weights_logsumexp_method],
    "attention_head": [_head_unscaled, _head_not_causal, _head_swapped, _head_sdpa, _head_naive_attention,
                       _head_package_attention],
    "next_token_probs": [_probs_no_temperature, _probs_times_temperature, _probs_ignores_top_k, _probs_filter_logits],
    "merge_softmax_states": [_merge_no_rescale, _merge_min, _merge_nan_when_empty],
    "attend_one_query_block": [_attend_no_online, _attend_unscaled, _attend_full_softmax, _attend_full_transposed,
                               _attend_sdpa, _attend_row_by_row, _attend_row_by_row_elementwise, _attend_two_pass,
                               _attend_two_pass_transposed, _attend_package_forward, _attend_package_flash,
                               _attend_two_pass_batched],
    "key_blocks_to_visit": [_blocks_all, _blocks_no_mask_flag, _blocks_library],
    "flash_backward_tile": [_tile_no_delta, _tile_unnormalised, _tile_softmax_per_tile, _tile_unscaled,
                            _tile_transposed, _tile_ignores_mask],
    "assign_with_capacity": [_kept_all, _kept_latest, _kept_library],
    "switch_load_balancing_loss": [_lb_soft_f, _lb_no_scale, _lb_switch_library],
    "z_loss_gradient": [_zg_mean_sq_logits, _zg_no_mean, _zg_no_softmax, _zg_naive, _zg_autograd],
    "aux_free_step": [_aux_free_biased_gates, _aux_free_unnormalised, _aux_free_unbiased_load, _aux_free_first_choices,
                      _aux_free_reversed, _aux_free_proportional, _aux_free_no_bias],
    "priority_slots": [_slots_token_major, _slots_library, _slots_library_renamed, _slots_two_choices_only],
    "balancing_loss_over_layers": [_lb_concatenated, _lb_mean_over_layers, _lb_library, _lb_layers_argmax],
    "expert_choice_kept": [_ec_token_choice, _ec_global_top],
    "dispatch_mask": [_mask_with_dropped],
    "gpt2_param_count": [_params_untied, _params_no_position, _params_no_biases, _params_model_info],
    "upcycle_mlp": [_upcycle_no_transpose, _upcycle_shared_memory],
    "decode_attention": [_decode_top_left_mask, _decode_unscaled, _decode_sdpa],
    "published_moe_params": [_moe_wrong(all_active=True), _moe_wrong(shared=False), _moe_wrong(dense_layers=False),
                             _moe_wrong(tied=False), _moe_wrong(routers=False), _moe_wrong(norms=False), _moe_library,
                             _moe_private_parts],
    "send_splits": [_splits_per_expert, _splits_even],
    "all_to_all_volume": [_volume_one_way, _volume_all_rows, _volume_library],
}

WALKTHROUGHS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def test_every_registered_check_has_wrong_answers():
    assert set(CHECKS) == set(WRONG_ANSWERS)


@pytest.mark.parametrize("name", sorted(WRONG_ANSWERS))
def test_check_rejects_wrong_answers(name, capsys):
    for wrong in WRONG_ANSWERS[name]:
        assert CHECKS[name](wrong) is False, f"check for {name} accepted {wrong.__name__}"
        assert capsys.readouterr().out.startswith(f"✗ {name}: ")
    assert CHECKS[name](_unsolved) is False
    assert "not implemented yet" in capsys.readouterr().out


@pytest.mark.parametrize("walkthrough", WALKTHROUGHS, ids=lambda p: p.stem)
def test_every_exercise_has_a_check_and_a_passing_solution(walkthrough, capsys):
    exercises = exercises_in(walkthrough)
    assert len(exercises) >= 2, f"{walkthrough.name} has fewer exercises than the course promises"
    solutions = ROOT / "solutions" / f"{walkthrough.stem}_solutions.ipynb"
    assert solutions.exists(), f"{solutions} is missing"
    assert exercises_in(solutions) == exercises
    walkthrough_code = "\n".join(notebook_cells(walkthrough))
    namespace = solution_namespace(solutions)
    for name, fn_name in exercises.items():
        assert name in CHECKS, f"no check registered for exercise {name}"
        assert 'raise NotImplementedError("Exercise' in walkthrough_code
        assert CHECKS[name](namespace[fn_name]) is True, capsys.readouterr().out


def test_later_cells_use_the_learners_function_only_when_solved(capsys):
    from moe_tutorial.exercises import learner_or_package

    def mine():
        return 1

    def package():
        return 2

    assert learner_or_package(True, mine, package, "demo") is mine
    assert "your solution" in capsys.readouterr().out
    assert learner_or_package(False, mine, package, "demo") is package
    assert "package version" in capsys.readouterr().out


def test_refuse_library_call_catches_the_library_itself_and_reads_what_it_can():
    from functools import partial

    from moe_tutorial import router
    from moe_tutorial.exercises import CheckFailed, refuse_library_call

    with pytest.raises(CheckFailed):  # the library function handed in as the answer
        refuse_library_call(router.positions_in_expert, router.positions_in_expert, "write it")
    with pytest.raises(CheckFailed):  # called inside the answer
        refuse_library_call(lambda e, n: router.positions_in_expert(e, n), router.positions_in_expert, "write it")
    positions_in_expert = router.positions_in_expert
    refuse_library_call(partial(torch.add, 1), positions_in_expert, "write it")  # no code to read: no crash
