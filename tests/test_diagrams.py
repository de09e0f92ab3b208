"""The diagrams notebooks draw with moe_tutorial.diagrams: what a reader sees in them (the labels,
which boxes the arrows join, how many arrows there are), and that they render and fit."""

import io
from collections import Counter
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.image import imread
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from moe_tutorial import diagrams

NEAR = 8  # pixels: an arrow's end this close to a box touches it (arrows stop a few points short)


def boxes(ax):
    """[(label, extent in pixels)] of the boxes drawn on ax, in drawing order. A box's label is the first
    text drawn inside it and inside no smaller box: a filled box's text, a rank frame's name."""
    extents = [p.get_window_extent() for p in ax.patches if isinstance(p, FancyBboxPatch)]
    texts = [(t.get_text(), t.get_transform().transform(t.get_position())) for t in ax.texts if t.get_text()]
    labelled = []
    for box in extents:
        smaller = [b for b in extents if b.width * b.height < box.width * box.height]
        inside = [text for text, xy in texts if box.contains(*xy) and not any(b.contains(*xy) for b in smaller)]
        if inside:
            labelled.append((inside[0], box))
    return labelled


def boxes_at(point, labelled):
    """The labels of the boxes at (or within NEAR pixels of) a point, outermost first."""
    at = [(label, box) for label, box in labelled if box.padded(NEAR).contains(*point)]
    return tuple(label for label, box in sorted(at, key=lambda item: -item[1].width * item[1].height))


class Arrow(NamedTuple):
    start: tuple  # pixels
    end: tuple
    source: tuple  # labels of the boxes at its start, outermost first (a rank, then a box in it)
    target: tuple  # ... and at its end
    color: str
    heads: int  # 1: one way; 2: an exchange


def arrows(ax):
    """Every arrow drawn on ax, with the boxes it joins."""
    labelled, found = boxes(ax), []
    for patch in ax.patches:
        if isinstance(patch, FancyArrowPatch):
            shaft, *heads = patch.get_transform().transform_path(patch.get_path()).to_polygons(closed_only=False)
            start, end = tuple(shaft[0]), tuple(shaft[-1])
            found.append(Arrow(start, end, boxes_at(start, labelled), boxes_at(end, labelled),
                               to_hex(patch.get_edgecolor()), len(heads)))
    return found


def texts_near(ax, point, pixels):
    """The texts a reader sees within `pixels` of a point (e.g. an arrow's label)."""
    renderer = ax.figure.canvas.get_renderer()
    return [t.get_text() for t in ax.texts
            if t.get_text() and t.get_window_extent(renderer).padded(pixels).contains(*point)]


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def middle(arrow):
    return ((arrow.start[0] + arrow.end[0]) / 2, (arrow.start[1] + arrow.end[1]) / 2)


def assert_readable(fig):
    """It renders to a PNG that is not blank; every text lies inside the figure, and a text centred in
    a filled box lies inside that box. Then the figure is closed."""
    png = io.BytesIO()
    fig.savefig(png, format="png")
    image = imread(io.BytesIO(png.getvalue()))
    assert np.allclose(image.shape[:2], (fig.bbox.height, fig.bbox.width), atol=1) and np.ptp(image) > 0
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        filled = [p.get_window_extent(renderer) for p in ax.patches if isinstance(p, FancyBboxPatch) and p.get_fill()]
        for text in [*ax.texts, ax.title]:
            if not text.get_text():
                continue
            t = text.get_window_extent(renderer)
            assert fig.bbox.x0 - 1 <= t.x0 and t.x1 <= fig.bbox.x1 + 1, f"{text.get_text()!r} leaves the figure"
            assert fig.bbox.y0 - 1 <= t.y0 and t.y1 <= fig.bbox.y1 + 1, f"{text.get_text()!r} leaves the figure"
            for b in filled:
                if b.contains((t.x0 + t.x1) / 2, (t.y0 + t.y1) / 2):
                    assert b.x0 - 1 <= t.x0 and t.x1 <= b.x1 + 1 and b.y0 - 1 <= t.y0 and t.y1 <= b.y1 + 1, (
                        f"{text.get_text()!r} overflows its box")
    plt.close(fig)


def test_moe_layer_diagram_drops_the_token_over_capacity():
    choice, capacity = (1, 0, 1, 3, 1, 0), 2  # token 4 is expert 1's third: over capacity
    fig = diagrams.moe_layer_diagram(choice=choice, n_experts=4, capacity=capacity)
    (ax,) = fig.axes
    drawn = arrows(ax)
    # every token has an arrow to its router box, which names the expert it picked (and a gate)
    router_box = {a.source: a.target[0] for a in drawn if a.source and a.source[0].startswith("token ")}
    route = [router_box[(f"token {t}",)] for t in range(len(choice))]
    assert [label.partition(",")[0] for label in route] == [f"expert {e}" for e in choice]
    expert = [f"expert {e}\nMLP ({used}/{capacity} slots)" for e, used in enumerate((2, 2, 0, 1))]
    expected = Counter()  # (boxes at the start, boxes at the end) of each arrow
    for t, e in enumerate(choice):
        expected[(f"token {t}",), (route[t],)] += 1
        if t == 4:  # over capacity: its arrow stops short of the experts
            expected[(route[t],), ()] += 1
        else:  # dispatched to its expert, whose output comes back in token order
            expected[(route[t],), (expert[e],)] += 1
            expected[(expert[e],), (f"g · E{e}(x{t})",)] += 1
    assert Counter((a.source, a.target) for a in drawn) == expected
    (stopped,) = [a for a in drawn if not a.target]
    assert texts_near(ax, stopped.end, NEAR) == ["expert 1 full:\ndropped"]  # the note where it stops
    assert texts(fig).count("0 (dropped)") == 1  # its output: nothing, it rides the residual
    assert_readable(fig)


def assert_all_to_all_exchanges(ax, experts_per_rank, choices):
    """Blue: each rank's count box "n → rank s" joins rank s's box "n from rank r", with the same n, for
    every pair that exchanges rows. Green: each expert sends results to exactly the ranks whose rows it ran."""
    sends = {(f"rank {r}", f"rank {e // experts_per_rank}") for r, rank in enumerate(choices) for e in rank}
    blue = [a for a in arrows(ax) if a.color == to_hex("tab:blue")]
    assert {(a.source[0], a.target[0]) for a in blue} == sends and len(blue) == len(sends)
    for a in blue:
        (sender, sent), (receiver, got) = a.source, a.target
        n, _, to_rank = sent.partition(" → ")
        m, _, from_rank = got.partition(" from ")
        assert (to_rank, from_rank, n) == (receiver, sender, m), f"{sent!r} in {sender} joins {got!r} in {receiver}"
    green = Counter((a.source, a.target[0]) for a in arrows(ax) if a.color == to_hex("tab:green"))
    served = {(f"rank {e // experts_per_rank}", f"e{e}", f"rank {r}")  # an expert, its rank, a rank whose row it ran
              for r, rank in enumerate(choices) for e in rank}
    drawn = {(source[0], source[-1].partition(":")[0], target) for source, target in green}
    assert drawn == served and len(green) == len(served) and set(green.values()) == {1}


def test_all_to_all_diagram_shows_counts_dispatch_and_return():
    choices = [[0, 0, 3, 1], [2, 3, 3, 3, 0]]  # experts 0, 1 live on rank 0; 2, 3 on rank 1
    fig = diagrams.all_to_all_diagram(world_size=2, experts_per_rank=2, choices=choices)
    (ax,) = fig.axes
    drawn = arrows(ax)
    # rank 0 keeps 3 rows (experts 0, 0, 1) and sends 1 (expert 3); rank 1 sends 1 home to rank 0 and keeps 4
    blue = {(a.source, a.target) for a in drawn if a.color == to_hex("tab:blue")}
    assert blue == {(("rank 0", "3 rows → rank 0"), ("rank 0", "3 rows from rank 0")),
                    (("rank 0", "1 row → rank 1"), ("rank 1", "1 row from rank 0")),
                    (("rank 1", "1 row → rank 0"), ("rank 0", "1 row from rank 1")),
                    (("rank 1", "4 rows → rank 1"), ("rank 1", "4 rows from rank 1"))}
    assert_all_to_all_exchanges(ax, 2, choices)  # 2 experts per rank
    # what arrived goes to the local expert it was routed to
    gray = {(a.source[1], a.target[1]) for a in drawn if a.color == to_hex("gray")}
    assert gray == {("3 rows from rank 0", "e0: 3 rows"), ("3 rows from rank 0", "e1: 1 row"),
                    ("1 row from rank 1", "e0: 3 rows"), ("1 row from rank 0", "e3: 4 rows"),
                    ("4 rows from rank 1", "e2: 1 row"), ("4 rows from rank 1", "e3: 4 rows")}
    # results come home to the outputs: 4 tokens on rank 0, 5 on rank 1
    outputs = {a.target for a in drawn if a.color == to_hex("tab:green")}
    assert outputs == {("rank 0", "y: 4 tokens\n= Σ gate × result"), ("rank 1", "y: 5 tokens\n= Σ gate × result")}
    # the counts go first: one exchange between the two ranks, labelled
    (counts,) = [a for a in drawn if a.heads == 2]
    assert (counts.source[0], counts.target[0]) == ("rank 0", "rank 1")
    assert texts_near(ax, middle(counts), 20) == ["all_to_all_single\non the counts"]
    assert_readable(fig)


@pytest.mark.parametrize("world_size, experts_per_rank", [(2, 2), (3, 2), (2, 4)])
def test_all_to_all_diagram_fits_for_other_shapes(world_size, experts_per_rank):
    fig = diagrams.all_to_all_diagram(world_size, experts_per_rank)
    (ax,) = fig.axes
    assert [label for label, _ in boxes(ax) if label.startswith("rank")] == [f"rank {r}" for r in range(world_size)]
    assert {f"e{e}" for e in range(world_size * experts_per_rank)} <= {t.partition(":")[0] for t in texts(fig)}
    assert_all_to_all_exchanges(ax, experts_per_rank, diagrams.example_routing(world_size, experts_per_rank))
    assert len([a for a in arrows(ax) if a.heads == 2]) == world_size - 1  # counts, between neighbouring ranks
    assert_readable(fig)


def test_all_to_all_diagram_refuses_unknown_experts():
    with pytest.raises(ValueError, match="lists of experts in 0..3"):
        diagrams.all_to_all_diagram(2, 2, choices=[[0, 4], [1]])


def test_parallelism_diagram_names_what_each_scheme_holds_and_exchanges():
    fig = diagrams.parallelism_diagram()
    assert [ax.get_title() for ax in fig.axes] == ["data parallel", "tensor parallel", "expert parallel"]
    held = {  # the boxes inside each rank's frame
        "data parallel": [["the whole model\n(a copy)", "batch slice 0"],
                          ["the whole model\n(a copy)", "batch slice 1"]],
        "tensor parallel": [["half of every\nweight matrix", "the whole batch"]] * 2,
        "expert parallel": [["attention, routers,\nembeddings (a copy)", "e0", "e1", "e2", "e3", "batch slice 0"],
                            ["attention, routers,\nembeddings (a copy)", "e4", "e5", "e6", "e7", "batch slice 1"]],
    }
    exchanged = {"data parallel": "all-reduce the gradients", "tensor parallel": "all-reduce activations",
                 "expert parallel": "all-to-all tokens"}
    for ax in fig.axes:
        labelled = boxes(ax)
        frames = {label: box for label, box in labelled if label.startswith("rank ")}
        assert list(frames) == ["rank 0", "rank 1"]
        inside = [sorted(label for label, box in labelled if label not in frames and frame.contains(*box.p0))
                  for frame in frames.values()]
        assert inside == [sorted(labels) for labels in held[ax.get_title()]]
        # one exchange, from under rank 0 to under rank 1, labelled with what travels
        (exchange,) = arrows(ax)
        assert exchange.heads == 2
        assert frames["rank 0"].x0 < exchange.start[0] < frames["rank 0"].x1
        assert frames["rank 1"].x0 < exchange.end[0] < frames["rank 1"].x1
        (label,) = texts_near(ax, middle(exchange), 20)
        assert label.startswith(exchanged[ax.get_title()])
    assert_readable(fig)


def test_flash_tiling_diagram_shows_blocks_memories_and_traffic():
    fig = diagrams.flash_tiling_diagram(n_blocks=4, query_block=2, key_block=1)
    (ax,) = fig.axes
    labelled = boxes(ax)
    hbm, sram = "HBM (GPU DRAM): large, slow", "SRAM (on-chip, per SM): small, fast"
    memories = {label: box for label, box in labelled if label in (hbm, sram)}
    assert list(memories) == [hbm, sram]
    held = {memory: [label for label, box in labelled if label not in memories and extent.contains(*box.p0)]
            for memory, extent in memories.items()}
    # HBM: the blocks of this step, one each in the rows Q, K, V, O (the other blocks are blank)
    assert sorted(held[hbm]) == sorted(["$Q_i$", "$K_j$", "$V_j$", "$O_i$, $L_i$"])
    q, kv, scores, running = (next(label for label in held[sram] if label.startswith(start))
                              for start in ("$Q_i$", "$K_j$, $V_j$", "score tile", "running max"))
    for words in ("S_{ij}", "m_i", "\\ell_i", "acc_i"):
        assert words in scores + running, f"{words!r} missing from the on-chip boxes"
    # the traffic: Q_i, K_j, V_j in; S_ij and the running statistics stay on chip; O_i, L_i out once
    traffic = Counter((a.source[-1], a.target[-1], tuple(texts_near(ax, middle(a), 5))) for a in arrows(ax))
    assert traffic == {(hbm, q, ("load once",)): 1, (hbm, kv, ("stream $j$ = 0, 1, …",)): 1, (hbm, kv, ()): 1,
                       (kv, scores, ()): 1, (scores, running, ()): 1,
                       (running, hbm, ("write once: $O_i = acc_i / \\ell_i$",)): 1}
    assert "no T × T matrix here" in texts(fig)
    assert_readable(fig)
