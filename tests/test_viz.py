"""The routing explorer, driven from Python: set values, check what it renders."""

import re

import matplotlib
import pytest
import torch

from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.model import GPT
from moe_tutorial.tokenizers import CharTokenizer
from moe_tutorial.viz import RoutingExplorer, plot_routing, route_text

matplotlib.use("Agg")
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 2


@pytest.fixture
def model_and_tokenizer():
    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16,
                          moe=MoEConfig(n_experts=4)))
    with torch.no_grad():  # a skewed router, so that small capacities really drop tokens
        for layer in model.moe_layers():
            layer.router.gate.weight.normal_(std=2.0)
    return model, tokenizer


def n_dropped(html):
    return len(re.findall(r'class="dropped"', html))


def capacity_line(html):
    return int(re.search(r'data-capacity="(\d+)"', html).group(1))


def bar_counts(html):
    return [int(c) for c in re.findall(r'data-count="(\d+)"', html)]


def test_route_text_counts_and_capacity(model_and_tokenizer):
    model, tok = model_and_tokenizer
    r = route_text(model, tok, TEXT, layer=1, capacity_factor=1.0)
    assert len(r.expert) == len(r.dropped) == len(TEXT)  # padding is not reported
    assert sum(r.counts) == len(TEXT) - r.n_dropped
    assert sum(r.demand) == len(TEXT) and all(d >= c for d, c in zip(r.demand, r.counts))
    assert [d - c for d, c in zip(r.demand, r.counts)] == [
        sum(1 for e, x in zip(r.expert, r.dropped) if e == expert and x) for expert in range(r.n_experts)]
    n_padded = -(-len(TEXT) // 32) * 32  # whole windows of block_size
    assert max(r.counts) <= r.capacity == -(-n_padded // 4)  # ceil(1.0 * N / E)
    short = route_text(model, tok, "to be", layer=0, capacity_factor=1.0)
    assert short.capacity == 2  # one unpadded window: ceil(5 / 4)
    with pytest.raises(ValueError, match="layer"):
        route_text(model, tok, TEXT, layer=5)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        route_text(model, tok, "Zebra!", layer=0)


def test_explorer_follows_the_slider_layer_and_text(model_and_tokenizer):
    model, tok = model_and_tokenizer
    explorer = RoutingExplorer(model, tok, TEXT, capacity_factor=2.0)
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

    explorer.text.value = "to be"
    spans = re.findall(r'<span class="(?:routed|dropped)" data-expert="(\d+)"', explorer.text_view.value)
    assert len(spans) == 5
    assert [int(e) for e in spans] == route_text(model, tok, "to be", 1, 0.5).expert

    explorer.text.value = "Zebra"  # unknown character: a message, not a traceback
    assert "not in the vocabulary" in explorer.error.value
    explorer.text.value = "to be"
    assert explorer.error.value == ""


def test_static_rendering_matches(model_and_tokenizer):
    model, tok = model_and_tokenizer
    r = route_text(model, tok, TEXT, layer=0, capacity_factor=0.5)
    fig = plot_routing(r)
    title = fig.axes[0].get_title()
    assert f"dropped {r.n_dropped}" in title
    bars = [p.get_height() for p in fig.axes[1].patches]
    assert bars == r.demand + r.counts  # outlined demand, then what was processed in front of it
    assert max(r.demand) > r.capacity >= max(r.counts)  # at cf 0.5 the overflow is visible above the line
    matplotlib.pyplot.close(fig)


def test_dense_model_is_refused():
    tok = CharTokenizer.from_text(TEXT)
    dense = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="no MoE layers"):
        route_text(dense, tok, "to be")
