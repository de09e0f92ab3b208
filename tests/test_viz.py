"""The routing explorer, driven from Python: it reports exactly what the layer did, for every router
the course teaches; set values, check what it renders."""

import re

import matplotlib
import pytest
import torch

from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.model import GPT
from moe_tutorial.moe import override_capacity
from moe_tutorial.tokenizers import CharTokenizer
from moe_tutorial.viz import RoutingExplorer, expert_colors, plot_routing, route_text, token_detail

matplotlib.use("Agg")
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 2
TOKENIZER = CharTokenizer.from_text(TEXT)

ROUTERS = {
    "top-1": MoEConfig(n_experts=4),
    "top-2": MoEConfig(n_experts=4, top_k=2),
    "expert choice": MoEConfig(n_experts=4, routing="expert_choice"),
    "sigmoid + bias + shared": MoEConfig(n_experts=4, top_k=2, scoring="sigmoid", bias_update_rate=1e-3,
                                         aux_loss_coef=0.0, n_shared_experts=1),
}


def skewed_model(moe: MoEConfig, block_size=32):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOKENIZER.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16,
                          moe=moe))
    with torch.no_grad():  # a skewed router, so that small capacities really drop tokens
        for layer in model.moe_layers():
            layer.router.gate.weight.normal_(std=2.0)
    return model.eval()


@pytest.fixture
def model_and_tokenizer():
    return skewed_model(ROUTERS["top-1"]), TOKENIZER


def n_dropped(html):
    return len(re.findall(r'class="dropped"', html))


def capacity_line(html):
    return int(re.search(r'data-capacity="(\d+)"', html).group(1))


def bar_counts(html):
    return [int(c) for c in re.findall(r'data-count="(\d+)"', html)]


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_the_explorer_reports_what_the_layer_did(name, capacity_factor):
    """Processed counts are the layer's kept assignments; dropped are the characters with none."""
    model = skewed_model(ROUTERS[name])
    text = TEXT[:100]  # 100 characters, block 32: 4 windows of 25, no padding
    r = route_text(model, TOKENIZER, text, layer=0, capacity_factor=capacity_factor)
    ids = torch.tensor(TOKENIZER.encode(text)).view(4, 25)
    with torch.no_grad(), override_capacity(model.moe_layers()[0], capacity_factor):
        routing = model(ids, return_routing=True).routing[0]
    assert (r.windows, r.window_length, r.n_padding) == (4, 25, 0)
    assert r.processed == routing.tokens_processed.tolist()
    assert r.dropped == routing.dropped.tolist() and r.n_dropped == int(routing.dropped.sum())
    assert r.capacity == routing.capacity and sum(r.padding_processed) == 0
    if routing.expert_choice:
        assert r.processed == [r.capacity] * 4  # each expert takes exactly C tokens
        assert sum(n * count for n, count in enumerate(r.experts_per_character)) == 4 * r.capacity
    else:
        k = ROUTERS[name].top_k
        assert sum(r.demand) == k * len(text)  # every choice, first and second
        assert all(len(row) == k for row in r.assignments)
        assert r.rescued == [not row[0].kept and any(a.kept for a in row[1:]) for row in r.assignments]
        assert r.capacity == -(-int(capacity_factor * 100) * k // 4)  # ceil(cf * k * N / E), no padding in N


def test_capacity_follows_the_formula_the_notebook_teaches():
    model = skewed_model(ROUTERS["top-1"], block_size=64)
    r = route_text(model, TOKENIZER, TEXT[:100], capacity_factor=1.0)
    assert (r.windows, r.window_length, r.n_routed, r.capacity) == (2, 50, 100, 25)  # ceil(100 / 4): no padding
    assert "ceil(1 · 1 · 100 / 4) = 25" in r.capacity_formula()
    odd = route_text(model, TOKENIZER, TEXT[:101], capacity_factor=1.0)  # 2 windows of 51: 1 padding
    assert odd.n_padding == 1 and odd.n_routed == 102 and len(odd.assignments) == 101


def test_padding_is_reported_not_hidden():
    model = skewed_model(ROUTERS["top-2"])
    r = route_text(model, TOKENIZER, TEXT[:97], capacity_factor=0.5)  # 4 windows of 25: 3 padding
    assert r.n_padding == 3
    assert [p + c for p, c in zip(r.padding_processed, r.processed)] == [
        sum(1 for row in r.assignments for a in row if a.expert == e and a.kept) + r.padding_processed[e]
        for e in range(4)]
    assert all(p + c <= r.capacity for p, c in zip(r.padding_processed, r.processed))


def test_token_detail_names_experts_gates_slots_and_fate():
    model = skewed_model(ROUTERS["top-2"])
    r = route_text(model, TOKENIZER, TEXT, capacity_factor=0.5)
    i = next(i for i, row in enumerate(r.assignments) if not row[0].kept)
    detail = token_detail(r, i)
    first = r.assignments[i][0]
    assert f"expert {first.expert}: gate {first.weight:.2f}, slot {first.slot + 1} of {r.capacity}, over capacity" \
        in detail
    assert "router probability: e" in detail


def test_colours_are_distinct_up_to_32_experts():
    for n in (4, 8, 16, 32):
        assert len(set(expert_colors(n))) == n


def test_dropped_characters_keep_their_experts_colour(model_and_tokenizer):
    model, tok = model_and_tokenizer
    r = route_text(model, tok, TEXT, capacity_factor=0.5)
    html = RoutingExplorer(model, tok, TEXT, capacity_factor=0.5).text_view.value
    dropped = re.findall(r'class="dropped" data-expert="(\d+)"[^>]*style="([^"]*)"', html)
    assert len(dropped) == r.n_dropped > 0
    colors = expert_colors(r.n_experts)
    assert all(colors[int(e)] in style and "line-through" in style for e, style in dropped)


def test_explorer_follows_the_slider_layer_text_and_model(model_and_tokenizer):
    model, tok = model_and_tokenizer
    explorer = RoutingExplorer({"top-1": model, "expert choice": skewed_model(ROUTERS["expert choice"])}, tok, TEXT,
                               capacity_factor=2.0)
    assert explorer.capacity.description == "capacity factor"
    wide_drops, wide_cap = n_dropped(explorer.text_view.value), capacity_line(explorer.chart.value)
    explorer.capacity.value = 0.5  # as if the learner dragged the slider
    assert n_dropped(explorer.text_view.value) > wide_drops
    assert capacity_line(explorer.chart.value) < wide_cap
    assert f"dropped {explorer.routing.n_dropped}" in explorer.summary.value
    assert sum(bar_counts(explorer.chart.value)) == len(TEXT) - explorer.routing.n_dropped
    assert sum(int(d) for d in re.findall(r'data-demand="(\d+)"', explorer.chart.value)) == len(TEXT)

    layer0 = explorer.text_view.value
    explorer.layer.value = 1
    assert explorer.routing.layer == 1 and explorer.text_view.value != layer0

    explorer.view.value = "every layer"  # one panel per MoE layer
    assert explorer.text_view.value.count('class="moe-panel"') == 2 and "MoE layer 1" in explorer.text_view.value
    explorer.view.value = "every model"  # the same text through every model, this layer
    assert explorer.text_view.value.count('class="moe-panel"') == 2 and "expert choice" in explorer.text_view.value
    explorer.view.value = "this layer"

    explorer.model_choice.value = "expert choice"
    assert explorer.routing.expert_choice and "expert choice" in explorer.summary.value
    assert "experts per character" in explorer.chart.value

    explorer.text.value = "to be"
    spans = re.findall(r'<span class="(?:routed|rescued|dropped)" data-expert="(\d+)"', explorer.text_view.value)
    assert [int(e) for e in spans] == route_text(explorer.model, tok, "to be", 0, 0.5).expert

    explorer.character.value = 3
    assert "&#x27;b&#x27;: character 3" in explorer.detail.value

    explorer.text.value = "Zebra"  # unknown character: a message, and no stale view left on screen
    assert "not in the vocabulary" in explorer.error.value
    assert explorer.summary.value == explorer.chart.value == explorer.text_view.value == ""
    explorer.text.value = "to be"
    assert explorer.error.value == "" and explorer.text_view.value


def test_static_rendering_matches(model_and_tokenizer):
    model, tok = model_and_tokenizer
    r = route_text(model, tok, TEXT, layer=0, capacity_factor=0.5)
    fig = plot_routing(r)
    title = fig.axes[0].get_title()
    assert f"dropped {r.n_dropped}" in title
    bars = [p.get_height() for p in fig.axes[1].patches]
    assert bars == r.demand + r.processed  # outlined demand, then what was processed in front of it
    assert max(r.demand) > r.capacity >= max(r.processed)  # at cf 0.5 the overflow is visible above the line
    matplotlib.pyplot.close(fig)


def test_dense_model_is_refused():
    dense = GPT(GPTConfig(vocab_size=TOKENIZER.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="no MoE layers"):
        route_text(dense, TOKENIZER, "to be")
    with pytest.raises(ValueError, match="the text is empty"):
        route_text(skewed_model(ROUTERS["top-1"]), TOKENIZER, "")


def test_a_saved_notebook_shows_the_static_view_not_a_repr(model_and_tokenizer):
    model, tok = model_and_tokenizer
    explorer = RoutingExplorer(model, tok, TEXT)
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # live: the widget
    assert 'class="moe-text"' in bundle["text/html"] and "capacity-line" in bundle["text/html"]  # saved: the view


def test_gate_priority_keeps_the_highest_gated_tokens_and_drops_need_not_fall_at_the_end():
    model = skewed_model(ROUTERS["top-1"])
    arrival = route_text(model, TOKENIZER, TEXT, capacity_factor=0.5)
    gate = route_text(model, TOKENIZER, TEXT, capacity_factor=0.5, priority="gate")
    # top-1: the same slots are filled, by other tokens (here padding, routed too, wins some of them)
    assert (gate.n_dropped - sum(gate.padding_processed) == arrival.n_dropped - sum(arrival.padding_processed))
    assert gate.dropped != arrival.dropped and gate.priority == "gate"
    for e in range(gate.n_experts):
        kept = [row[0].weight for row in gate.assignments if row[0].expert == e and row[0].kept]
        over = [row[0].weight for row in gate.assignments if row[0].expert == e and not row[0].kept]
        if kept and over:
            assert min(kept) >= max(over)
    first_drop = arrival.dropped.index(True)
    assert any(gate.dropped[:first_drop])  # under arrival order nothing before this was dropped
    with pytest.raises(ValueError, match="priority must be"):
        route_text(model, TOKENIZER, TEXT, priority="random")


def test_highlighting_an_expert_fades_the_others(model_and_tokenizer):
    model, tok = model_and_tokenizer
    explorer = RoutingExplorer(model, tok, TEXT)
    explorer.highlight.value = 2
    faded = explorer.text_view.value.count("opacity:0.25")
    assert faded == len(TEXT) - sum(1 for row in explorer.routing.assignments if any(a.kept and a.expert == 2
                                                                                    for a in row))
    explorer.priority.value = "gate"
    assert "batch priority routing" in explorer.summary.value


def test_clicking_an_experts_button_under_its_bar_highlights_it(model_and_tokenizer):
    model, tok = model_and_tokenizer
    explorer = RoutingExplorer({"top-1": model, "expert choice": skewed_model(ROUTERS["expert choice"])}, tok, TEXT)
    buttons = explorer.expert_buttons.children
    assert [b.description for b in buttons] == [str(e) for e in range(explorer.routing.n_experts)]
    number_under_bar = 'margin-right:4px;text-align:center">0</div>'
    assert number_under_bar not in explorer.chart.value  # the live chart leaves the numbers to the buttons
    buttons[2].click()
    assert explorer.highlight.value == 2 and "opacity:0.25" in explorer.text_view.value
    buttons[2].click()  # a second click clears it
    assert explorer.highlighted is None and "opacity:0.25" not in explorer.text_view.value
    assert explorer.highlight.label == "no expert"  # the menu says so (a None value would show it blank)
    explorer.model_choice.value = "expert choice"  # another model: one button per expert of its own
    assert len(explorer.expert_buttons.children) == explorer.routing.n_experts
    assert number_under_bar in explorer.static_html()  # the saved view keeps the numbers under the bars
