"""Seeing routing: which expert each character goes to, what gets dropped, how full each expert is
(notebook 03; the heatmaps of notebook 04).

`route_text` runs a trained MoE char model on a text and returns one layer's routing.
`routing_html` / `load_chart_html` render it as HTML (the live explorer uses these), and
`plot_routing` draws the same view with matplotlib (for nbval, static exports and papers).
`RoutingExplorer` is the ipywidgets panel: layer, capacity factor and text in; coloured text
and per-expert load against the capacity line out, updated live.
"""

import html
from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import hsv_to_rgb, to_hex

from .evaluate import evaluating
from .moe import override_capacity
from .router import Routing, capacity, positions_in_expert

NO_EXPERT = -1  # the explorer's "highlight" menu: no expert highlighted


@dataclass
class Assignment:
    """One (character, expert) pair the router made."""

    expert: int
    weight: float  # the gate: how much of the expert's output the character gets
    slot: int  # arrival order at the expert (0-based): its slot if kept
    kept: bool  # within the expert's capacity: the expert processes it


@dataclass
class TextRouting:
    """One MoE layer's routing of a text, character by character, for every router the course
    teaches: top-1 and top-k token choice (every assignment, best first) and expert choice (the
    experts that picked each character), softmax or sigmoid scores, with or without shared experts."""

    text: str
    layer: int
    n_experts: int
    top_k: int  # token choice: experts per token; expert choice: the k in C = ceil(cf * k * N / E)
    expert_choice: bool
    capacity: int  # slots per expert
    capacity_factor: float
    n_routed: int  # N: what the router saw, the characters plus the padding of the last window
    windows: int  # the text routed as one batch of this many windows ...
    window_length: int  # ... of this many characters
    n_shared: int  # shared experts: every token goes to them too, with no capacity
    sigmoid: bool  # affinities are per-expert sigmoids (DeepSeek-V3), not one softmax
    assignments: list  # per character: [Assignment], best first (expert choice: by weight)
    affinity: list  # per character: the router's score for every expert
    padding_processed: list  # per expert: slots the padding took
    priority: str = "arrival"  # who gets an expert's slots first: "arrival" (the layer's rule) or "gate"

    @property
    def dropped(self) -> list:
        """Per character: no expert processes it (it skips the layer on the residual)."""
        return [not any(a.kept for a in row) for row in self.assignments]

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped)

    @property
    def rescued(self) -> list:
        """Per character (top-k): its first choice was over capacity, a later choice took it."""
        return [not self.expert_choice and not row[0].kept and any(a.kept for a in row[1:])
                for row in self.assignments]

    @property
    def expert(self) -> list:
        """Per character, the expert that colours it: the first that processes it, else its first
        choice (expert choice: else the expert it scores highest)."""
        colour = []
        for row, scores in zip(self.assignments, self.affinity):
            kept = [a.expert for a in row if a.kept]
            colour.append(kept[0] if kept else row[0].expert if row else max(range(self.n_experts),
                                                                              key=scores.__getitem__))
        return colour

    @property
    def processed(self) -> list:
        """Per expert: the characters it processes (its kept assignments; padding not counted)."""
        counts = [0] * self.n_experts
        for row in self.assignments:
            for a in row:
                counts[a.expert] += a.kept
        return counts

    @property
    def demand(self) -> list:
        """Per expert: the characters that asked for it (every choice, before capacity); under
        expert choice the experts choose, so demand is what they took."""
        if self.expert_choice:
            return self.processed
        counts = [0] * self.n_experts
        for row in self.assignments:
            for a in row:
                counts[a.expert] += 1
        return counts

    @property
    def experts_per_character(self) -> list:
        """How many characters got 0, 1, 2, ... experts (expert choice spreads them unevenly)."""
        per = [sum(a.kept for a in row) for row in self.assignments]
        return [per.count(n) for n in range(max(per, default=0) + 1)]

    @property
    def n_padding(self) -> int:
        return self.n_routed - len(self.text)

    def capacity_formula(self) -> str:
        """How the capacity came about, with this text's numbers."""
        exact = capacity(self.n_routed, self.n_experts, self.capacity_factor, self.top_k)
        text = (f"capacity = ceil(cf · k · N / E) = ceil({self.capacity_factor:g} · {self.top_k} · "
                f"{self.n_routed} / {self.n_experts}) = {exact}")
        return text if exact == self.capacity else f"{text}, bounded to {self.capacity} (min/max_capacity)"


def expert_colors(n_experts):
    """Distinct colours, safe for colour-blind readers up to 8 experts (Okabe & Ito's palette);
    beyond 8, hues spaced by the golden angle at three lightnesses, so 32 experts still differ.
    Each expert also gets an underline style (expert_underline), a cue that needs no colour."""
    okabe_ito = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999"]
    if n_experts <= len(okabe_ito):
        return okabe_ito[:n_experts]
    return [to_hex(hsv_to_rgb(((i * 0.618034) % 1.0, 0.75, (0.95, 0.7, 0.5)[i % 3]))) for i in range(n_experts)]


def expert_underline(expert: int) -> str:
    return ("solid", "dashed", "dotted", "double")[expert % 4]


@torch.no_grad()
def route_text(model, tokenizer, text, layer=0, capacity_factor=1.0, priority="arrival") -> TextRouting:
    """Route `text` through the model; report MoE layer number `layer` (0 = first MoE layer).

    `priority="gate"` gives an expert's slots to the highest-gated tokens first instead of the
    earliest (V-MoE's batch priority routing, Riquelme et al. 2021): what that rule would keep from
    the same choices. The course's layers keep by arrival; expert choice has no such order.

    The text is one batch, as during training, so capacity is shared by all of it: B windows of at
    most block_size characters, as equal as can be (B = ceil(n / block_size), T = ceil(n / B)).
    Only the last window is padded, by fewer than B characters. Padding is routed too: it counts in
    N, and whatever slots it takes are reported (padding_processed), never hidden.
    """
    moe_layers = model.moe_layers()
    if not moe_layers:
        raise ValueError("this model has no MoE layers: build it with GPTConfig(moe=MoEConfig(...))")
    if not 0 <= layer < len(moe_layers):
        raise ValueError(f"layer must be in 0..{len(moe_layers) - 1}, got {layer}")
    if not text:
        raise ValueError("the text is empty: type some characters to route")
    ids = torch.tensor(tokenizer.encode(text))
    n = len(ids)
    B = -(-n // model.config.block_size)
    T = -(-n // B)
    windows = torch.cat([ids, ids.new_zeros(B * T - n)]).view(B, T)  # (B, T)
    if priority not in ("arrival", "gate"):
        raise ValueError(f"priority must be 'arrival' or 'gate', got {priority!r}")
    with evaluating(model), override_capacity(moe_layers[layer], capacity_factor):
        routing = model(windows, return_routing=True).routing[layer]
    if priority == "gate" and not routing.expert_choice:
        routing = by_gate_priority(routing)
    config = moe_layers[layer].router.config
    rows = []
    for i in range(n):
        if routing.expert_choice:  # columns are experts: those that picked token i
            picked = routing.kept[i].nonzero().flatten().tolist()
            row = [Assignment(e, routing.weights[i, e].item(), routing.position[i, e].item(), True) for e in picked]
            row.sort(key=lambda a: -a.weight)
        else:
            columns = (routing.expert[i], routing.weights[i], routing.position[i], routing.kept[i])
            row = [Assignment(*values) for values in zip(*(c.tolist() for c in columns))]
        rows.append(row)
    padding = routing.expert[n:][routing.kept[n:]]
    return TextRouting(
        text=text, layer=layer, n_experts=routing.probs.size(1),
        top_k=config.top_k if routing.expert_choice else routing.expert.size(1),  # the k routing used
        expert_choice=routing.expert_choice, capacity=routing.capacity,
        capacity_factor=capacity_factor, n_routed=B * T, windows=B, window_length=T,
        n_shared=config.n_shared_experts, sigmoid=config.scoring == "sigmoid",
        assignments=rows, affinity=routing.probs[:n].tolist(),
        padding_processed=torch.bincount(padding, minlength=routing.probs.size(1)).tolist(),
        priority="arrival" if routing.expert_choice else priority)


def by_gate_priority(routing: Routing) -> Routing:
    """The same choices with slots given in order of each token's top gate, highest first (first
    choices of all tokens before any second choice, as the layer does): batch priority routing."""
    order = torch.argsort(routing.weights[:, 0], descending=True, stable=True)  # (N,) tokens by priority
    ranked = positions_in_expert(routing.expert[order], routing.probs.size(1))  # (N, k) in that order
    position = torch.empty_like(ranked)
    position[order] = ranked  # back to token order
    return replace(routing, position=position, kept=position < routing.capacity)


def token_detail(r: TextRouting, i: int) -> str:
    """Everything about character i, as plain text: its experts, gates, slots, and the affinities."""
    ch = r.text[i]
    lines = [f"{ch!r}: character {i} (window {i // r.window_length}, position {i % r.window_length})"]
    for a in r.assignments[i]:
        fate = "processed" if a.kept else "over capacity: not processed"
        lines.append(f"expert {a.expert}: gate {a.weight:.2f}, slot {a.slot + 1} of {r.capacity}, {fate}")
    if not r.assignments[i]:
        lines.append("no expert picked it")
    if not any(a.kept for a in r.assignments[i]):  # dropped
        lines.append("dropped: it skips this layer (the residual carries it on)")
    if r.n_shared:
        lines.append(f"shared expert{'s' if r.n_shared > 1 else ''}: always processed")
    scores = sorted(enumerate(r.affinity[i]), key=lambda pair: -pair[1])
    shown = ", ".join(f"e{e} {p:.2f}" for e, p in scores[:6])
    lines.append(f"{'sigmoid affinity' if r.sigmoid else 'router probability'}: {shown}"
                 + (", ..." if len(scores) > 6 else ""))
    return "\n".join(lines)


def routing_html(r: TextRouting, highlight: int | None = None) -> str:
    """The text, wrapped, each character on its expert's colour with that expert's underline.
    Dropped characters keep their colour, hatched and struck through; characters a later choice
    took have a dotted outline. A grey bar marks the start of each window. Hover for the detail.
    With `highlight`, the characters that expert processes stand out and the rest fade."""
    colors = expert_colors(r.n_experts)
    spans = []
    for i, (ch, e, dropped, rescued) in enumerate(zip(r.text, r.expert, r.dropped, r.rescued)):
        shown = "⏎\n" if ch == "\n" else html.escape(ch)
        style = f"border-bottom:2px {expert_underline(e)} {colors[e]};"
        if dropped:
            kind = "dropped"
            style += (f"background:repeating-linear-gradient(45deg,{colors[e]}66 0 3px,#fff 3px 6px);"
                      f"text-decoration:line-through")
        else:
            kind = "rescued" if rescued else "routed"
            style += f"background:{colors[e]}59" + (";outline:1px dotted #333" if rescued else "")
        if i and i % r.window_length == 0:
            style += ";box-shadow:inset 2px 0 0 #888"
        if highlight is not None and highlight not in [a.expert for a in r.assignments[i] if a.kept]:
            style += ";opacity:0.25"
        experts = ",".join(str(a.expert) for a in r.assignments[i] if a.kept)
        spans.append(f'<span class="{kind}" data-expert="{e}" data-experts="{experts}" '
                     f'title="{html.escape(token_detail(r, i))}" style="{style}">{shown}</span>')
    return ('<div class="moe-text" style="font-family:monospace;line-height:1.9;white-space:pre-wrap;'
            f'overflow-wrap:anywhere;max-width:100%">{"".join(spans)}</div>')


def bar_width(n_experts: int) -> int:
    """Pixels per expert bar (the live explorer's expert buttons line up with the bars)."""
    return 28 if n_experts <= 16 else 16


def load_chart_html(r: TextRouting, height_px=120, labels=True) -> str:
    """Per expert: its demand (outlined bar: characters that asked for it) and what it processed
    (filled; grey on top: slots the padding took), numbers above, a y axis, and the capacity as a
    dashed black line. The outlined part above the line is what was dropped. Without `labels` the
    expert numbers under the bars are left out (the live explorer puts buttons there)."""
    colors = expert_colors(r.n_experts)
    even_share = r.top_k * len(r.text) / r.n_experts  # a fixed scale, so the line moves with the slider
    top = max(2 * even_share, max(r.demand), r.capacity, 1) * 1.15
    width = bar_width(r.n_experts)
    bars = []
    for e, (c, d, pad) in enumerate(zip(r.processed, r.demand, r.padding_processed)):
        outline = height_px * max(d, c + pad) / top
        bars.append(
            f'<div class="bar" data-expert="{e}" data-count="{c}" data-demand="{d}" data-padding="{pad}" '
            f'title="expert {e}: asked for by {d}, processed {c}{f", padding took {pad}" if pad else ""}" '
            f'style="position:relative;width:{width}px;margin-right:4px;height:{outline:.1f}px;'
            f'border:1px solid {colors[e]};box-sizing:border-box;display:flex;flex-direction:column;'
            f'justify-content:flex-end"><div style="position:absolute;top:-14px;width:100%;text-align:center;'
            f'font-size:9px">{d}</div><div style="height:{height_px * pad / top:.1f}px;background:#bbb"></div>'
            f'<div style="height:{height_px * c / top:.1f}px;background:{colors[e]}"></div></div>')
    line = (f'<div class="capacity-line" data-capacity="{r.capacity}" style="position:absolute;left:0;right:0;'
            f'bottom:{height_px * r.capacity / top:.1f}px;border-top:2px dashed #000"></div>')
    axis = (f'<div style="position:relative;width:30px;height:{height_px}px;font-size:9px;text-align:right;'
            f'margin-right:4px;border-right:1px solid #666">'
            + "".join(f'<div style="position:absolute;right:3px;bottom:{height_px * v / top - 5:.1f}px">{v}</div>'
                      for v in sorted({0, r.capacity, max(r.demand)})) + "</div>")
    numbers = "".join(f'<div style="width:{width}px;margin-right:4px;text-align:center">{e}</div>'
                      for e in range(r.n_experts))
    numbers = f'<div style="display:flex;font-size:11px;margin-left:34px">{numbers}</div>' if labels else ""
    legend = (f"experts per character: {', '.join(f'{k}: {n}' for k, n in enumerate(r.experts_per_character))}"
              if r.expert_choice else "outline: asked for it (every choice) · filled: processed · grey: padding")
    return (f'<div class="moe-load" style="padding-top:16px"><div style="display:flex;align-items:flex-end">{axis}'
            f'<div style="position:relative;display:flex;align-items:flex-end;height:{height_px}px">{"".join(bars)}'
            f'{line}</div></div>{numbers}'
            f'<div style="font-size:11px">expert · - - - capacity {r.capacity} per expert · {legend}</div></div>')


def summary_text(r: TextRouting) -> str:
    n = len(r.text)
    kind = (f"expert choice (each expert takes its {r.capacity} best tokens)" if r.expert_choice
            else f"top-{r.top_k} token choice")
    pad = f", {r.n_padding} padding" if r.n_padding else ", no padding"
    rescued = f", {sum(r.rescued)} taken by a later choice" if r.top_k > 1 and not r.expert_choice else ""
    shared = f"; plus {r.n_shared} shared expert(s) for every character" if r.n_shared else ""
    if r.priority == "gate":
        shared += "; slots by gate, highest first (what batch priority routing would keep; the layer keeps by arrival)"
    return (f"MoE layer {r.layer}, {kind}: {n} characters in {r.windows} window(s) of {r.window_length}{pad}; "
            f"N = {r.n_routed}, E = {r.n_experts}, k = {r.top_k}; {r.capacity_formula()}; "
            f"dropped {r.n_dropped} ({100 * r.n_dropped / n:.1f}%, no expert){rescued}{shared}")


def plot_routing(r: TextRouting, chars_per_line=64, max_lines=8):
    """Static matplotlib version of the explorer: coloured text (dropped characters hatched and
    struck through) and the load chart."""
    colors = expert_colors(r.n_experts)
    lines = [list(range(i, min(i + chars_per_line, len(r.text))))
             for i in range(0, len(r.text), chars_per_line)][:max_lines]
    fig, (ax_text, ax_load) = plt.subplots(
        1, 2, figsize=(14, 0.5 * len(lines) + 2.2), gridspec_kw={"width_ratios": [3, 1]})
    for row, idx in enumerate(lines):
        ax_text.text(-0.5, -row, str(idx[0]), ha="right", va="center", fontsize=8, color="#666")  # offset
        for col, i in enumerate(idx):
            y, color = -row, colors[r.expert[i]]
            ax_text.add_patch(plt.Rectangle((col, y - 0.5), 1, 1, facecolor=color, alpha=0.45,
                                            hatch="////" if r.dropped[i] else None, edgecolor="white", lw=0))
            ch = "⏎" if r.text[i] == "\n" else r.text[i]
            ax_text.text(col + 0.5, y, ch, ha="center", va="center", family="monospace", fontsize=11)
            if r.dropped[i]:
                ax_text.plot([col + 0.1, col + 0.9], [y, y], color="black", lw=1)
    ax_text.set(xlim=(-3, chars_per_line), ylim=(-len(lines) + 0.5, 0.5))
    ax_text.set_title(f"MoE layer {r.layer}: {len(r.text)} characters, capacity {r.capacity} per expert, "
                      f"dropped {r.n_dropped} (hatched)", fontsize=10)
    ax_text.axis("off")
    x = range(r.n_experts)
    ax_load.bar(x, r.demand, color="white", edgecolor=colors, linewidth=1.5, label="asked for it")
    ax_load.bar(x, r.processed, color=colors, label="processed")
    ax_load.axhline(r.capacity, color="black", ls="--", label=f"capacity {r.capacity}")
    ax_load.set(xlabel="expert", ylabel="characters", xticks=list(x), title="demand vs capacity")
    ax_load.legend(fontsize=8)
    fig.tight_layout()
    return fig


class RoutingExplorer:
    """ipywidgets panel: choose the model, the MoE layer, the capacity factor and the text; see the
    routing. `models` is one model or a dict of named ones (e.g. top-1, top-2, expert choice)."""

    def __init__(self, models, tokenizer, text, capacity_factor=1.0):
        import ipywidgets as widgets

        self.models = models if isinstance(models, dict) else {"model": models}
        self.tokenizer = tokenizer
        self.model_choice = widgets.Dropdown(options=list(self.models), description="model",
                                             layout=widgets.Layout(display="flex" if len(self.models) > 1 else "none"))
        self.layer = widgets.Dropdown(description="layer")
        self.highlight = widgets.Dropdown(description="highlight")  # one expert's characters
        self.expert_buttons = widgets.HBox(layout=widgets.Layout(margin="0 0 0 34px"))  # under the bars
        self._set_layers()
        self.priority = widgets.Dropdown(options=[("arrival", "arrival"), ("highest gate", "gate")],
                                         description="slots by")
        self.capacity = widgets.FloatSlider(value=capacity_factor, min=0.25, max=3.0, step=0.05,
                                            description="capacity factor", continuous_update=True,
                                            readout_format=".2f", style={"description_width": "initial"})
        self.text = widgets.Textarea(value=text, description="text", layout=widgets.Layout(width="98%", height="80px"))
        self.character = widgets.BoundedIntText(value=0, min=0, max=max(len(text) - 1, 0),
                                                description="character #", style={"description_width": "initial"},
                                                layout=widgets.Layout(width="180px"))
        self.summary, self.error, self.chart = widgets.HTML(), widgets.HTML(), widgets.HTML()
        self.text_view = widgets.HTML(layout=widgets.Layout(width="98%"))
        self.detail = widgets.HTML()
        views = ["this layer", "every layer"] + (["every model"] if len(self.models) > 1 else [])
        self.view = widgets.Dropdown(options=views, description="show")
        self.model_choice.observe(lambda change: (self._set_layers(), self.update()), names="value")
        for control in (self.layer, self.capacity, self.text, self.character, self.view, self.highlight,
                        self.priority):
            control.observe(lambda change: self.update(), names="value")
        self.widget = widgets.VBox([  # the chart above the text, so it stays in view however long the text
            widgets.HBox([self.model_choice, self.layer, self.capacity]),
            widgets.HBox([self.view, self.highlight, self.priority]), self.text, self.error, self.summary,
            self.chart, self.expert_buttons, self.text_view, widgets.HBox([self.character, self.detail]),
        ], layout=widgets.Layout(width="100%", overflow="hidden"))
        self.widget.add_class("moe-routing-explorer")
        self.routing = None
        self.update()

    @property
    def model(self):
        return self.models[self.model_choice.value]

    def _set_layers(self):
        n_layers = len(self.model.moe_layers())
        self.layer.options = [(f"MoE layer {i}", i) for i in range(n_layers)]
        self.layer.value = 0 if n_layers else None
        n_experts = self.model.moe_layers()[0].router.n_experts if n_layers else 0
        # -1, not None: a Dropdown whose value is None shows no selection (a blank menu)
        self.highlight.options = [("no expert", NO_EXPERT)] + [(f"expert {e}", e) for e in range(n_experts)]
        self.highlight.value = NO_EXPERT
        self._set_expert_buttons(n_experts)

    def _set_expert_buttons(self, n_experts: int):
        """One button per expert under its bar: a click highlights that expert's characters, a
        second click clears the highlight (the "highlight" menu does the same)."""
        import ipywidgets as widgets

        width, colors = bar_width(n_experts), expert_colors(n_experts)
        buttons = []
        for e in range(n_experts):
            button = widgets.Button(description=str(e), tooltip=f"highlight expert {e}'s characters",
                                    layout=widgets.Layout(width=f"{width}px", height="20px", padding="0",
                                                          margin="0 4px 0 0"))
            button.style.button_color = colors[e] + "59"
            button.style.font_size = "11px"
            button.add_class("moe-expert-button")
            button.on_click(lambda _, e=e: self._toggle_highlight(e))
            buttons.append(button)
        self.expert_buttons.children = buttons

    def update(self):
        try:
            self.routing = route_text(self.model, self.tokenizer, self.text.value, self.layer.value,
                                      self.capacity.value, self.priority.value)
        except ValueError as err:  # e.g. a character the tokenizer does not know: clear the stale view
            self.routing = None
            self.error.value = f'<span style="color:#b00">{html.escape(str(err))}</span>'
            self.summary.value = self.chart.value = self.text_view.value = self.detail.value = ""
            return
        self.error.value = ""
        self.summary.value = f"<b>{html.escape(summary_text(self.routing))}</b>"
        self.chart.value = load_chart_html(self.routing, labels=False)
        self.text_view.value = self._text_panels()
        self.character.max = len(self.routing.text) - 1
        i = min(self.character.value, self.character.max)
        detail = html.escape(token_detail(self.routing, i))
        self.detail.value = f'<pre class="moe-detail" style="font-size:11px;margin:0">{detail}</pre>'

    def _toggle_highlight(self, expert: int):
        self.highlight.value = NO_EXPERT if self.highlight.value == expert else expert

    @property
    def highlighted(self) -> int | None:
        """The expert whose characters stand out, or None."""
        return None if self.highlight.value == NO_EXPERT else self.highlight.value

    def _text_panels(self) -> str:
        """The coloured text: of the chosen layer, of every MoE layer, or of every model at this layer."""
        if self.view.value == "this layer":
            return routing_html(self.routing, self.highlighted)
        if self.view.value == "every layer":
            panels = {f"MoE layer {i}": (self.model, i) for i in range(len(self.model.moe_layers()))}
        else:
            panels = {name: (model, self.layer.value) for name, model in self.models.items()
                      if self.layer.value < len(model.moe_layers())}
        parts = []
        for title, (model, layer) in panels.items():
            r = route_text(model, self.tokenizer, self.text.value, layer, self.capacity.value, self.priority.value)
            parts.append(f'<div class="moe-panel" style="font-size:11px;margin-bottom:6px"><b>{html.escape(title)}'
                         f'</b> · dropped {r.n_dropped} · {r.capacity} slots per expert'
                         f'{routing_html(r, self.highlighted)}</div>')
        return "".join(parts)

    def static_html(self) -> str:
        """The current view as plain HTML: what a saved notebook shows where no kernel runs the
        widget (an untrusted or static view falls back from the widget to this)."""
        if self.routing is None:
            return self.error.value
        return (f"<div class='moe-routing-static'><p>{self.summary.value}</p>{load_chart_html(self.routing)}"
                f"{self.text_view.value}</div>")

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)  # the live widget, and its text/plain repr
        bundle["text/html"] = self.static_html()  # ranked above text/plain: shown where the widget cannot be
        return bundle
