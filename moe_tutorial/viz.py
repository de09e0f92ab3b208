"""Seeing routing: which expert each character goes to, what gets dropped, how full each expert is
(notebook 03; the heatmaps of notebook 04).

`route_text` runs a trained MoE char model on a text and returns one layer's routing.
`routing_html` / `load_chart_html` render it as HTML (the live explorer uses these), and
`plot_routing` draws the same view with matplotlib (for nbval, static exports and papers).
`RoutingExplorer` is the ipywidgets panel: layer, capacity factor and text in; coloured text
and per-expert load against the capacity line out, updated live.
"""

import html
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import to_hex

from .evaluate import evaluating
from .moe import override_capacity


@dataclass
class TextRouting:
    text: str
    expert: list  # first-choice expert of each character
    dropped: list  # bool per character: its first choice was over capacity
    counts: list  # tokens each expert processed
    capacity: int  # slots per expert
    n_experts: int
    layer: int

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped)

    @property
    def demand(self) -> list:
        """Tokens whose first choice is each expert, before capacity cuts it: counts + dropped."""
        return [self.expert.count(e) for e in range(self.n_experts)]


def expert_colors(n_experts):
    cmap = plt.get_cmap("tab10" if n_experts <= 10 else "tab20")
    return [to_hex(cmap(i % cmap.N)) for i in range(n_experts)]


@torch.no_grad()
def route_text(model, tokenizer, text, layer=0, capacity_factor=1.0) -> TextRouting:
    """Route `text` through the model; report MoE layer number `layer` (0 = first MoE layer).

    The text is cut into windows of block_size characters that form one batch, so capacity
    is shared by all of it, as during training. The last window is padded; padding comes last
    in arrival order, so it never takes a real character's slot, and it is not counted (it
    does count in N for the capacity, ceil(cf * N / E)).
    """
    moe_layers = model.moe_layers()
    if not moe_layers:
        raise ValueError("this model has no MoE layers: build it with GPTConfig(moe=MoEConfig(...))")
    if not 0 <= layer < len(moe_layers):
        raise ValueError(f"layer must be in 0..{len(moe_layers) - 1}, got {layer}")
    if not text:
        raise ValueError("text is empty")
    ids = torch.tensor(tokenizer.encode(text))
    T = min(model.config.block_size, len(ids))  # a short text is one window, unpadded
    pad = (-len(ids)) % T
    windows = torch.cat([ids, ids.new_zeros(pad)]).view(-1, T)  # (B, T); padding routed too
    with evaluating(model), override_capacity(moe_layers[layer], capacity_factor):
        routing = model(windows, return_routing=True).routing[layer]
    n = len(ids)
    expert, kept = routing.expert[:n, 0], routing.kept[:n, 0]
    counts = torch.bincount(expert[kept], minlength=routing.probs.size(1))
    return TextRouting(
        text=text, expert=expert.tolist(), dropped=(~kept).tolist(),
        counts=counts.tolist(), capacity=routing.capacity,
        n_experts=routing.probs.size(1), layer=layer,
    )


def routing_html(r: TextRouting) -> str:
    """The text, each character on its expert's colour; dropped characters struck out in red."""
    colors = expert_colors(r.n_experts)
    spans = []
    for ch, e, dropped in zip(r.text, r.expert, r.dropped):
        shown = "⏎<br>" if ch == "\n" else html.escape(ch).replace(" ", "&nbsp;")
        if dropped:
            spans.append(f'<span class="dropped" data-expert="{e}" title="expert {e}: over capacity, dropped" '
                         f'style="background:#eee;color:#d00;text-decoration:line-through">{shown}</span>')
        else:
            spans.append(f'<span class="routed" data-expert="{e}" title="expert {e}" '
                         f'style="background:{colors[e]}55">{shown}</span>')
    return f'<div class="moe-text" style="font-family:monospace;line-height:1.6">{"".join(spans)}</div>'


def load_chart_html(r: TextRouting, height_px=120) -> str:
    """Per expert: its demand (outlined bar: tokens that chose it) and what it processed (filled part),
    with a dashed line at the capacity; the outlined part above the line is what was dropped."""
    colors = expert_colors(r.n_experts)
    # A fixed scale (twice the even share), so the capacity line visibly moves with the slider.
    even_share = len(r.text) / r.n_experts
    top = max(2 * even_share, max(r.demand), r.capacity, 1) * 1.1
    bars = "".join(
        f'<div class="bar" data-expert="{e}" data-count="{c}" data-demand="{d}" '
        f'title="expert {e}: chosen by {d} tokens, processed {c}" style="width:28px;margin-right:4px;'
        f'height:{height_px * d / top:.1f}px;border:1px solid {colors[e]};box-sizing:border-box;display:flex;'
        f'align-items:flex-end"><div style="width:100%;height:{height_px * c / top:.1f}px;'
        f'background:{colors[e]}"></div></div>'
        for e, (c, d) in enumerate(zip(r.counts, r.demand))
    )
    line = (f'<div class="capacity-line" data-capacity="{r.capacity}" style="position:absolute;left:0;right:0;'
            f'bottom:{height_px * r.capacity / top:.1f}px;border-top:2px dashed #d00"></div>')
    labels = "".join(f'<div style="width:28px;margin-right:4px;text-align:center">{e}</div>'
                     for e in range(r.n_experts))
    return (f'<div class="moe-load"><div style="position:relative;display:flex;align-items:flex-end;'
            f'height:{height_px}px">{bars}{line}</div><div style="display:flex;font-size:11px">{labels}</div>'
            f'<div style="font-size:11px;color:#d00">- - capacity {r.capacity} per expert; outline: demand, '
            f'filled: processed</div></div>')


def summary_text(r: TextRouting) -> str:
    n = len(r.text)
    return (f"MoE layer {r.layer}: {n} characters, capacity {r.capacity} per expert, "
            f"dropped {r.n_dropped} ({100 * r.n_dropped / n:.1f}%)")


def plot_routing(r: TextRouting, chars_per_line=64, max_lines=8):
    """Static matplotlib version of the explorer: coloured text and the load chart."""
    colors = expert_colors(r.n_experts)
    lines = [list(range(i, min(i + chars_per_line, len(r.text))))
             for i in range(0, len(r.text), chars_per_line)][:max_lines]
    fig, (ax_text, ax_load) = plt.subplots(
        1, 2, figsize=(13, 0.35 * len(lines) + 1.6), gridspec_kw={"width_ratios": [4, 1]})
    for row, idx in enumerate(lines):
        for col, i in enumerate(idx):
            y = -row
            face = "#eeeeee" if r.dropped[i] else colors[r.expert[i]]
            ax_text.add_patch(plt.Rectangle((col, y - 0.5), 1, 1, color=face, alpha=1 if r.dropped[i] else 0.45))
            ch = "⏎" if r.text[i] == "\n" else r.text[i]
            ax_text.text(col + 0.5, y, ch, ha="center", va="center", family="monospace", fontsize=8,
                         color="#d00" if r.dropped[i] else "black")
            if r.dropped[i]:
                ax_text.plot([col + 0.1, col + 0.9], [y, y], color="#d00", lw=1)
    ax_text.set(xlim=(0, chars_per_line), ylim=(-len(lines) + 0.5, 0.5), title=summary_text(r))
    ax_text.axis("off")
    ax_load.bar(range(r.n_experts), r.demand, color="white", edgecolor=colors, linewidth=1.5, label="chose it")
    ax_load.bar(range(r.n_experts), r.counts, color=colors, label="processed")
    ax_load.axhline(r.capacity, color="#d00", ls="--", label=f"capacity {r.capacity}")
    ax_load.set(xlabel="expert", ylabel="tokens", xticks=range(r.n_experts), title="demand vs capacity")
    ax_load.legend(fontsize=8)
    fig.tight_layout()
    return fig


class RoutingExplorer:
    """ipywidgets panel: choose the MoE layer, the capacity factor and the text; see the routing."""

    def __init__(self, model, tokenizer, text, capacity_factor=1.0):
        import ipywidgets as widgets

        self.model, self.tokenizer = model, tokenizer
        n_layers = len(model.moe_layers())
        self.layer = widgets.Dropdown(options=[(f"MoE layer {i}", i) for i in range(n_layers)], value=0,
                                      description="layer")
        self.capacity = widgets.FloatSlider(value=capacity_factor, min=0.25, max=3.0, step=0.05,
                                            description="capacity", continuous_update=True, readout_format=".2f")
        self.text = widgets.Textarea(value=text, description="text", layout=widgets.Layout(width="95%", height="80px"))
        self.summary = widgets.HTML()
        self.text_view = widgets.HTML()
        self.chart = widgets.HTML()
        self.error = widgets.HTML()
        for control in (self.layer, self.capacity, self.text):
            control.observe(lambda change: self.update(), names="value")
        self.widget = widgets.VBox([
            widgets.HBox([self.layer, self.capacity]), self.text, self.summary, self.error,
            widgets.HBox([self.text_view, self.chart]),
        ])
        self.widget.add_class("moe-routing-explorer")
        self.routing = None
        self.update()

    def update(self):
        try:
            self.routing = route_text(self.model, self.tokenizer, self.text.value, self.layer.value,
                                      self.capacity.value)
        except ValueError as err:  # e.g. a character the tokenizer does not know
            self.error.value = f'<span style="color:#d00">{html.escape(str(err))}</span>'
            return
        self.error.value = ""
        self.summary.value = f"<b>{html.escape(summary_text(self.routing))}</b>"
        self.text_view.value = routing_html(self.routing)
        self.chart.value = load_chart_html(self.routing)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
