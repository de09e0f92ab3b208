"""The diagrams notebooks draw with moe_tutorial.diagrams: what they show, and that it fits."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from moe_tutorial import diagrams  # noqa: E402


def assert_texts_fit(fig):
    """Every text lies inside the figure, and a text centred in a filled box lies inside that box."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [p.get_window_extent(renderer) for p in ax.patches if isinstance(p, FancyBboxPatch) and p.get_fill()]
        for text in [*ax.texts, ax.title]:
            if not text.get_text():
                continue
            t = text.get_window_extent(renderer)
            assert fig.bbox.x0 - 1 <= t.x0 and t.x1 <= fig.bbox.x1 + 1, f"{text.get_text()!r} leaves the figure"
            assert fig.bbox.y0 - 1 <= t.y0 and t.y1 <= fig.bbox.y1 + 1, f"{text.get_text()!r} leaves the figure"
            for b in boxes:
                if b.contains((t.x0 + t.x1) / 2, (t.y0 + t.y1) / 2):
                    assert b.x0 - 1 <= t.x0 and t.x1 <= b.x1 + 1 and b.y0 - 1 <= t.y0 and t.y1 <= b.y1 + 1, (
                        f"{text.get_text()!r} overflows its box")


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _arrows(fig, color):
    return [p for ax in fig.axes for p in ax.patches
            if isinstance(p, FancyArrowPatch) and p.get_edgecolor() == to_rgba(color)]


def test_moe_layer_diagram_drops_the_token_over_capacity():
    fig = diagrams.moe_layer_diagram(choice=(1, 0, 1, 3, 1, 0), n_experts=4, capacity=2)
    texts = _texts(fig)
    assert texts.count("0 (dropped)") == 1 and "expert 1 full:\ndropped" in texts  # token 4: expert 1's third
    assert "expert 1\nMLP (2/2 slots)" in texts and "expert 2\nMLP (0/2 slots)" in texts
    assert len(_arrows(fig, "tab:blue")) == 5 and len(_arrows(fig, "tab:green")) == 5  # the kept tokens only
    assert_texts_fit(fig)
    plt.close(fig)


def test_all_to_all_diagram_shows_counts_dispatch_and_return():
    fig = diagrams.all_to_all_diagram(world_size=2, experts_per_rank=2, choices=[[0, 0, 3, 1], [2, 3, 3, 3, 0]])
    texts = _texts(fig)
    assert {"rank 0", "rank 1"} <= set(texts)
    # rank 0 keeps 3 rows (experts 0, 0, 1) and sends 1 (expert 3); rank 1 sends 1 home to rank 0 and keeps 4
    assert {"3 rows → rank 0", "1 row → rank 1", "1 row → rank 0", "4 rows → rank 1"} <= set(texts)
    assert {"3 rows from rank 0", "1 row from rank 1", "1 row from rank 0", "4 rows from rank 1"} <= set(texts)
    assert {"e0: 3 rows", "e1: 1 row", "e2: 1 row", "e3: 4 rows"} <= set(texts)
    assert any("counts" in t for t in texts)  # the counts go first
    assert len(_arrows(fig, "tab:blue")) == 4  # rows: every rank to every rank
    assert len(_arrows(fig, "tab:green")) == 4  # results: the way back
    assert_texts_fit(fig)
    plt.close(fig)


@pytest.mark.parametrize("world_size, experts_per_rank", [(2, 2), (3, 2), (2, 4)])
def test_all_to_all_diagram_fits_for_other_shapes(world_size, experts_per_rank):
    fig = diagrams.all_to_all_diagram(world_size, experts_per_rank)
    assert len(_arrows(fig, "tab:blue")) == world_size**2
    assert {f"rank {r}" for r in range(world_size)} <= set(_texts(fig))
    assert_texts_fit(fig)
    plt.close(fig)


def test_all_to_all_diagram_refuses_unknown_experts():
    with pytest.raises(ValueError, match="lists of experts in 0..3"):
        diagrams.all_to_all_diagram(2, 2, choices=[[0, 4], [1]])


def test_parallelism_diagram_names_what_each_scheme_exchanges():
    fig = diagrams.parallelism_diagram()
    assert [ax.get_title() for ax in fig.axes] == ["data parallel", "tensor parallel", "expert parallel"]
    texts = " ".join(_texts(fig))
    assert "all-reduce the gradients" in texts and "all-reduce activations" in texts and "all-to-all" in texts
    assert {f"e{e}" for e in range(8)} <= set(_texts(fig))  # the experts, split 4 + 4 over the ranks
    assert_texts_fit(fig)
    plt.close(fig)


def test_flash_tiling_diagram_shows_blocks_memories_and_traffic():
    fig = diagrams.flash_tiling_diagram(n_blocks=4, query_block=2, key_block=1)
    texts = _texts(fig)
    joined = "\n".join(texts)
    for label in ("HBM", "SRAM", "$Q_i$", "$K_j$", "$V_j$", "$O_i$", "$L_i$", "$m_i$", "\\ell_i", "acc_i", "S_{ij}"):
        assert label in joined, f"{label!r} missing from the flash tiling diagram"
    # the blocks of this step are labelled once each in HBM, in the rows Q, K, V, O
    assert [t for t in texts if t in ("$Q_i$", "$K_j$", "$V_j$", "$O_i$, $L_i$")] == [
        "$Q_i$", "$K_j$", "$V_j$", "$O_i$, $L_i$"]
    arrows = [a._posA_posB for a in _arrows(fig, "black")]  # (start, end) in data coordinates
    assert len(arrows) == 6
    hbm_right, sram_left = 4.9, 6.4  # the two memories' boxes: x < 4.9 is HBM, x > 6.4 is SRAM
    assert sum(a[0] < hbm_right and b[0] > sram_left for a, b in arrows) == 3  # Q_i, K_j, V_j in
    assert sum(a[0] > sram_left and b[0] < hbm_right for a, b in arrows) == 1  # O_i, L_i out
    for label in ("load once", "stream", "write once"):
        assert any(label in t for t in texts), f"no arrow labelled {label!r}"
    assert_texts_fit(fig)
    plt.close(fig)
