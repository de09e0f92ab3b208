"""Diagrams drawn as code: the pictures the notebooks explain with, in matplotlib.

Each function draws one picture on a new figure (or the `ax` it is given) and returns the figure,
so a notebook shows it with `plt.show()` and a test can check what was drawn (texts, arrows).
"""

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch


def _axes(ax, figsize):
    """(figure, axes) with no ticks or frame: a canvas in data coordinates."""
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    ax.set_axis_off()
    return ax.figure, ax


def _box(ax, x, y, w, h, text, color="#dbe8f5", fontsize=9):
    """A rounded box with centred text; (x, y) is its lower-left corner."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.05", facecolor=color,
                                edgecolor="black", linewidth=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, wrap=True)


def _arrow(ax, start, end, text=None, color="black", both_ways=False):
    """An arrow from start to end (both_ways: an exchange, heads at both ends), with an optional
    label at its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="<|-|>" if both_ways else "-|>", mutation_scale=12,
                                 color=color, linewidth=1.2))
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, text, ha="center", va="bottom", fontsize=8)


def moe_layer_diagram(choice=(1, 0, 1, 3, 1, 0), n_experts=4, capacity=2, ax=None):
    """An MoE layer's four steps for a few tokens: route (router picks an expert and a gate),
    dispatch (tokens grouped by expert, up to capacity), experts (one MLP each), combine (each
    output scaled by its gate, put back in token order; a dropped token's output is 0 and it rides
    the residual). `choice` is each token's expert; the default overfills expert 1. Notebook 03."""
    fig, ax = _axes(ax, figsize=(11, 4.2))
    n_tokens = len(choice)  # choice: each token's expert, in arrival order
    seen, kept = {}, []
    for e in choice:  # arrival order decides who fits
        seen[e] = seen.get(e, 0) + 1
        kept.append(seen[e] <= capacity)
    token_y = [n_tokens - 1 - t for t in range(n_tokens)]
    expert_y = [(n_tokens - 1) * (1 - (e + 0.5) / n_experts) for e in range(n_experts)]
    columns = {"tokens": 0.0, "route": 2.0, "experts": 5.0, "combine": 8.0}
    for name, x in columns.items():
        title = {"tokens": "1 · tokens x (N, C)", "route": "2 · route: softmax, top-1",
                 "experts": "3 · dispatch → experts", "combine": "4 · combine: gate × output"}[name]
        ax.text(x + 0.6, n_tokens - 0.1, title, ha="center", fontsize=9, weight="bold")
    for t in range(n_tokens):
        y = token_y[t]
        _box(ax, 0.0, y - 0.3, 1.2, 0.6, f"token {t}")
        _arrow(ax, (1.2, y), (2.0, y))
        gate = 0.4 + 0.1 * (t % 4)  # illustrative gate values
        _box(ax, 2.0, y - 0.3, 1.4, 0.6, f"expert {choice[t]}, g={gate:.1f}", color="#fdebd0", fontsize=8)
        out_text = f"g · E{choice[t]}(x{t})" if kept[t] else "0 (dropped)"
        _box(ax, 8.0, y - 0.3, 1.5, 0.6, out_text, color="#d5f5e3" if kept[t] else "#f5b7b1", fontsize=8)
        if kept[t]:
            _arrow(ax, (3.4, y), (5.0, expert_y[choice[t]]), color="tab:blue")
            _arrow(ax, (6.4, expert_y[choice[t]]), (8.0, y), color="tab:green")
        else:
            _arrow(ax, (3.4, y), (4.1, y), color="tab:red")
            ax.text(4.15, y, f"expert {choice[t]} full:\ndropped", color="tab:red", fontsize=7, va="center")
    for e in range(n_experts):
        used = sum(k and c == e for k, c in zip(kept, choice))
        _box(ax, 5.0, expert_y[e] - 0.35, 1.4, 0.7, f"expert {e}\nMLP ({used}/{capacity} slots)", color="#e8daef",
             fontsize=8)
    ax.set(xlim=(-0.2, 9.8), ylim=(-0.6, n_tokens + 0.2))
    return fig


def flash_tiling_diagram(n_blocks=4, query_block=2, key_block=1, ax=None):
    """One step of the FlashAttention-2 forward: where each block lives. Q, K, V and O stay in HBM (large,
    slow); the query block Q_i is loaded into on-chip SRAM once, key/value blocks K_j, V_j stream through it
    one at a time, the score tile S_ij and the running max m_i, sum l_i and output acc_i never leave it, and
    O_i and the logsumexp L_i are written back once. No T x T matrix ever goes to HBM. Notebook 02."""
    fig, ax = _axes(ax, figsize=(10, 4.4))
    hbm, sram = "#eeeeee", "#fff2d9"
    ax.add_patch(FancyBboxPatch((0.0, 0.0), 4.9, 5.2, boxstyle="round,pad=0.02,rounding_size=0.1",
                                facecolor=hbm, edgecolor="gray"))
    ax.text(2.45, 4.9, "HBM (GPU DRAM): large, slow", ha="center", fontsize=10, weight="bold")
    ax.add_patch(FancyBboxPatch((6.4, 0.0), 4.5, 5.2, boxstyle="round,pad=0.02,rounding_size=0.1",
                                facecolor=sram, edgecolor="gray"))
    ax.text(8.65, 4.9, "SRAM (on-chip, per SM): small, fast", ha="center", fontsize=10, weight="bold")
    # HBM: each tensor a row of n_blocks blocks along the sequence; the blocks of this step are coloured
    rows = {"Q": (4.05, query_block, "i"), "K": (3.15, key_block, "j"), "V": (2.35, key_block, "j"),
            "O": (0.75, query_block, "i")}
    width = 3.8 / n_blocks
    for name, (y, chosen, index) in rows.items():
        ax.text(0.35, y + 0.3, name, ha="center", va="center", fontsize=10, weight="bold")
        for b in range(n_blocks):
            label = f"${name}_{index}$" if b == chosen else ""
            if name == "O" and b == chosen:
                label = "$O_i$, $L_i$"
            color = ("#f6c28b" if index == "i" else "#a8d5a2") if b == chosen else "white"
            _box(ax, 0.8 + b * width, y, width - 0.08, 0.6, label, color=color)
    ax.text(2.7, 1.65, "no T × T matrix here", ha="center", va="center", fontsize=9, style="italic", color="gray")
    # SRAM: what one thread block holds while it works on query block i
    _box(ax, 6.8, 3.95, 3.7, 0.7, "$Q_i$: loaded once, kept for all $j$", color="#f6c28b")
    _box(ax, 6.8, 2.75, 3.7, 0.8, "$K_j$, $V_j$: one key/value block at a time", color="#a8d5a2")
    _box(ax, 6.8, 1.6, 3.7, 0.75, r"score tile $S_{ij} = Q_i K_j^{\top} / \sqrt{d}$, then $e^{S_{ij} - m_i}$")
    _box(ax, 6.8, 0.3, 3.7, 0.9, "running max $m_i$, sum $\\ell_i$, output $acc_i$\n"
                                "(rescaled by $e^{m_i - m_i'}$ when $m_i$ grows)", color="#f6c28b")
    _arrow(ax, (4.75, 4.32), (6.75, 4.32), "load once")
    _arrow(ax, (4.75, 3.42), (6.75, 3.42), "stream $j$ = 0, 1, …")
    _arrow(ax, (4.75, 2.65), (6.75, 2.95))
    _arrow(ax, (6.75, 1.02), (4.75, 1.02), "write once: $O_i = acc_i / \\ell_i$")
    _arrow(ax, (8.65, 2.7), (8.65, 2.4))
    _arrow(ax, (8.65, 1.55), (8.65, 1.25))
    ax.text(5.45, -0.3, "one thread block per query block $i$ (all in parallel); its inner loop streams "
                        "$j$ = 0, 1, … and never writes $S$ or $P$ to HBM", ha="center", fontsize=9)
    ax.set(xlim=(-0.1, 11.0), ylim=(-0.5, 5.3))
    return fig


# --- notebook 06: parallelism and the all-to-all -----------------------------------------------

def _rank_frame(ax, x, y, w, h, label):
    """A dashed frame around what one rank (one process, one GPU) holds, its name at the top left."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fill=False,
                                edgecolor="gray", linestyle="--", linewidth=1))
    ax.text(x + 0.08, y + h - 0.08, label, ha="left", va="top", fontsize=9, weight="bold", color="dimgray")


EXPERT_COLORS = ("#aed6f1", "#f9e79f", "#abebc6", "#f5cba7", "#d7bde2", "#a3e4d7", "#f5b7b1", "#d5dbdb")


def parallelism_diagram():
    """Data, tensor and expert parallelism on two ranks: what each rank holds, which slice of the
    batch it sees, and what the ranks exchange. Notebook 06, section 1."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    panels = {
        "data parallel": dict(model="the whole model\n(a copy)", batch="batch slice {r}",
                              talk="all-reduce the gradients,\nonce per step"),
        "tensor parallel": dict(model="half of every\nweight matrix", batch="the whole batch",
                                talk="all-reduce activations,\nin every layer"),
        "expert parallel": dict(model="attention, routers,\nembeddings (a copy)", batch="batch slice {r}",
                                talk="all-to-all tokens, out and back, in every\n"
                                     "MoE layer; all-reduce the other gradients"),
    }
    n_experts = 8
    for ax, (title, panel) in zip(axes, panels.items()):
        _axes(ax, None)
        ax.set_title(title, fontsize=11, weight="bold")
        for r in range(2):
            x0 = 0.15 + 3.0 * r
            _rank_frame(ax, x0, 1.1, 2.7, 3.0, f"rank {r}")
            _box(ax, x0 + 0.2, 2.95, 2.3, 0.75, panel["model"], fontsize=8)
            if title == "expert parallel":  # rank r keeps experts r*E/2 ... (r+1)*E/2 - 1
                for i in range(n_experts // 2):
                    e = r * n_experts // 2 + i
                    _box(ax, x0 + 0.2 + 0.59 * i, 2.2, 0.5, 0.55, f"e{e}", color=EXPERT_COLORS[e], fontsize=8)
            _box(ax, x0 + 0.2, 1.3, 2.3, 0.6, panel["batch"].format(r=r), color="#fdebd0", fontsize=8)
        _arrow(ax, (1.5, 0.85), (4.5, 0.85), both_ways=True)
        ax.text(3.0, 0.7, panel["talk"], ha="center", va="top", fontsize=8)
        ax.set(xlim=(0, 6), ylim=(-0.1, 4.2))
    fig.tight_layout()
    return fig


def _rows(n):
    return f"{n} row" if n == 1 else f"{n} rows"


def example_routing(world_size=2, experts_per_rank=2, tokens_per_rank=6):
    """A fixed, uneven example: expert of each token, for each rank (lists of ints)."""
    n_experts = world_size * experts_per_rank
    return [[(7 * t + 3 * r + t * t // 2) % n_experts for t in range(tokens_per_rank)] for r in range(world_size)]


def all_to_all_diagram(world_size=2, experts_per_rank=2, choices=None, ax=None):
    """One expert-parallel MoE layer, rank by rank: (1) each rank routes its tokens and sorts the
    rows by expert; (2) the counts go first, so every rank knows how many rows will arrive; (3) each
    block of rows travels to the rank that owns its experts (arrows); (4) the local experts run;
    (5) the results travel back (the same exchange, splits swapped) and are combined with the gates.
    `choices[r]`: the expert of each token of rank r (default: example_routing). Notebook 06."""
    W, n_local = world_size, experts_per_rank
    E = W * n_local
    choices = choices or example_routing(W, n_local)
    if len(choices) != W or any(not 0 <= e < E for rank in choices for e in rank):
        raise ValueError(f"choices must hold {W} lists of experts in 0..{E - 1}")
    owner = [e // n_local for e in range(E)]
    send = [[sum(owner[e] == s for e in choices[r]) for s in range(W)] for r in range(W)]  # rows r -> s
    per_expert = [sum(rank.count(e) for rank in choices) for e in range(E)]
    cell, block_min, gap = 0.36, 0.45, 0.12  # a row's height; the least height of a block (its count box)
    band = max(3.0, 0.85 + 0.55 * (max(W, n_local) - 1) + 0.6,  # height of one rank's lane
               max(0.85 + sum(max(cell * sum(owner[e] == s for e in rank), block_min) + gap for s in range(W))
                   for rank in choices))
    fig, ax = _axes(ax, figsize=(14, 1.2 + 1.45 * band * W / 2))
    top = W * band
    columns = [(0.75, "1 · route, sort rows\nby expert"), (3.3, "2 · counts first"),
               (6.6, "3 · rows to the rank\nthat owns their expert"), (9.15, "4 · local experts"),
               (12.35, "5 · results back,\ncombined with gates")]
    for x, title in columns:
        ax.text(x, top + 0.15, title, ha="center", va="bottom", fontsize=9, weight="bold")
    count_y, receive_y, expert_anchor, out_y = {}, {}, {}, {}
    for r in range(W):
        y0 = top - (r + 1) * band  # this rank's lane: y0 .. y0 + band
        _rank_frame(ax, 0.05, y0 + 0.08, 13.6, band - 0.16, f"rank {r}")
        # 1. the send buffer: this rank's rows sorted by expert, grouped by destination rank
        rows = sorted(choices[r])
        y = y0 + band - 0.55
        block_mid = count_y[r] = {}
        for s in range(W):
            block = [e for e in rows if owner[e] == s]
            y_start = y
            for e in block:
                _box(ax, 0.35, y - cell, 0.8, cell - 0.04, f"e{e}", color=EXPERT_COLORS[e % len(EXPERT_COLORS)],
                     fontsize=7)
                y -= cell
            y = min(y, y_start - block_min)  # room for the count box, even for an empty block
            block_mid[s] = (y_start + y) / 2
            y -= gap  # between destination blocks
        # 2. the counts: how many rows go to each rank (exchanged before the rows themselves)
        for s in range(W):
            _box(ax, 2.3, block_mid[s] - 0.2, 2.0, 0.4, f"{_rows(send[r][s])} → rank {s}", color="#fdebd0", fontsize=8)
            _arrow(ax, (1.2, block_mid[s]), (2.3, block_mid[s]))
        # 3. what arrives here, by source rank
        receive_y[r] = [y0 + band - 0.75 - 0.55 * src for src in range(W)]
        for src in range(W):
            _box(ax, 5.7, receive_y[r][src] - 0.2, 1.8, 0.4, f"{_rows(send[src][r])} from rank {src}",
                 color="#eaeded", fontsize=8)
        # 4. this rank's experts, each with the rows it got from every rank
        for i in range(n_local):
            e = r * n_local + i
            ye = y0 + band - 0.75 - 0.55 * i
            _box(ax, 8.35, ye - 0.2, 1.6, 0.4, f"e{e}: {_rows(per_expert[e])}",
                 color=EXPERT_COLORS[e % len(EXPERT_COLORS)], fontsize=8)
            if i == 0:
                expert_anchor[r] = ye
        for src in range(W):  # regroup what arrived by local expert (thin arrows: rows from src for expert e)
            for i in range(n_local):
                if choices[src].count(r * n_local + i):
                    _arrow(ax, (7.5, receive_y[r][src]), (8.35, expert_anchor[r] - 0.55 * i), color="gray")
        # 5. the results, back in this rank's token order
        out_y[r] = y0 + band / 2 - 0.1
        _box(ax, 11.3, out_y[r] - 0.35, 2.1, 0.7, f"y: {len(choices[r])} tokens\n= Σ gate × result", color="#d5f5e3",
             fontsize=8)
    for r in range(W - 1):  # the counts exchange, between neighbouring lanes
        _arrow(ax, (3.3, top - (r + 1) * band + 0.3), (3.3, top - (r + 1) * band - 0.3), both_ways=True)
        ax.text(3.45, top - (r + 1) * band, "all_to_all_single\non the counts", ha="left", va="center", fontsize=7,
                bbox=dict(facecolor="white", edgecolor="none", pad=1))
    for r in range(W):  # 3. dispatch: block s of rank r's buffer goes to rank s (an empty block sends nothing)
        for s in range(W):
            if send[r][s]:
                _arrow(ax, (4.3, count_y[r][s]), (5.7, receive_y[s][r]), color="tab:blue")
    for s in range(W):  # 5. the return trip: each expert sends its results home, to the ranks whose rows it ran
        for i in range(n_local):
            for r in range(W):
                if choices[r].count(s * n_local + i):
                    _arrow(ax, (9.95, expert_anchor[s] - 0.55 * i), (11.3, out_y[r] + 0.2 - 0.4 * s / max(W - 1, 1)),
                           color="tab:green")
    ax.text(5.0, -0.1, "blue: the rows, all_to_all_single with uneven splits", ha="center", va="top", fontsize=8,
            color="tab:blue")
    ax.text(10.6, -0.1, "green: the results, the same exchange with the splits swapped", ha="center", va="top",
            fontsize=8, color="tab:green")
    ax.set(xlim=(0, 13.8), ylim=(-0.5, top + 0.75))
    return fig
