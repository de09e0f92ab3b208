"""moe_tutorial.analysis (notebook 08): each measurement on cases with a known answer."""

import pytest
import torch

from moe_tutorial.analysis import (
    assignment_share,
    category_shares,
    coactivation,
    collect_routing,
    context_specialisation,
    layer_agreement,
    pruned_experts,
    random_routers,
    routing_entropy_bits,
    token_consistency,
    top_k_override,
    uncertainty_coefficient,
)
from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.model import GPT


def modern_moe(normalize=False, top_k=4):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=3, n_head=2, n_embd=32, norm="rmsnorm",
                         position="rope", activation="swiglu",
                         moe=MoEConfig(n_experts=8, top_k=top_k, expert_hidden=16, normalize_weights=normalize,
                                       capacity_factor_eval=0.5)))


def test_collect_routing_drops_nothing_and_restores_the_mode():
    model = modern_moe().train()
    routings = collect_routing(model, torch.randint(0, 40, (4, 32)))
    assert model.training and len(routings) == 3
    assert all(r.kept.all() for r in routings)  # capacity_factor_eval=0.5 would drop: generation never does
    assert all(torch.allclose(assignment_share(r).sum(), torch.tensor(1.0)) for r in routings)


def test_mutual_information_bounds():
    a = torch.arange(1000) % 5
    assert uncertainty_coefficient(a, a) == pytest.approx(1.0)
    assert uncertainty_coefficient((a + 2) % 5, a) == pytest.approx(1.0)  # a relabelling: still 1
    independent = (torch.arange(1000) // 200) % 5  # each value of b sees every value of a equally
    assert uncertainty_coefficient(independent, a) == pytest.approx(0.0, abs=1e-9)


def test_token_consistency_and_entropy():
    ids, experts = torch.tensor([5, 5, 5, 5, 2, 2, 9]), torch.tensor([1, 1, 1, 0, 3, 0, 2])
    assert token_consistency(ids, experts) == pytest.approx(5 / 7)
    assert token_consistency(ids, ids) == 1.0
    assert routing_entropy_bits(torch.full((16,), 1 / 16)) == pytest.approx(4.0)
    assert routing_entropy_bits(torch.tensor([1.0, 0, 0])) == 0.0


def test_category_shares_rows_are_each_experts_mix():
    model = modern_moe()
    routing = collect_routing(model, torch.randint(0, 40, (2, 32)))[0]
    categories = torch.randint(0, 3, (64,))
    shares = category_shares(routing, categories, 3)
    used = torch.bincount(routing.expert.reshape(-1), minlength=8) > 0
    assert torch.allclose(shares[used].sum(1), torch.ones(int(used.sum())))
    agreement = layer_agreement(collect_routing(model, torch.randint(0, 40, (2, 32))))
    assert torch.allclose(agreement.diagonal().double(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("normalize", [False, True])
def test_top_k_override_routes_with_fewer_experts_and_restores(normalize):
    model = modern_moe(normalize).eval()
    idx = torch.randint(0, 40, (2, 32))
    before = model(idx).logits
    with top_k_override(model, 1):
        routing = collect_routing(model, idx)[0]
        assert routing.expert.shape[1] == 1
        assert all(layer.router.top_k == 4 for layer in model.moe_layers())  # an argument, not a change
        if normalize:  # a renormalising model gives its lone expert weight 1
            assert torch.allclose(routing.weights, torch.ones_like(routing.weights))
        else:
            assert (routing.weights < 1).all()
    assert torch.equal(model(idx).logits, before)
    with pytest.raises(ValueError, match="top_k must be in"):
        with top_k_override(model, 9):
            pass


def test_pruned_experts_are_never_chosen_and_come_back():
    model = modern_moe().eval()
    idx = torch.randint(0, 40, (4, 32))
    before = model(idx).logits
    with pruned_experts(model, [[0, 1, 2], [7], []]):
        routings = collect_routing(model, idx)
        assert not torch.isin(routings[0].expert, torch.tensor([0, 1, 2])).any()
        assert not (routings[1].expert == 7).any()
        assert all(not layer.router.selection_bias.any() for layer in model.moe_layers())  # left as trained
    assert torch.equal(model(idx).logits, before)
    with pytest.raises(ValueError, match="leaves fewer than top_k=4"):
        with pruned_experts(model, [list(range(5)), [], []]):
            pass


def test_renormalised_pruning_is_a_checkpoint_with_the_experts_deleted():
    model = modern_moe().eval()
    idx = torch.randint(0, 40, (4, 32))
    pruned = [[0, 1, 2], [7], []]
    with pruned_experts(model, pruned, renormalise=True):
        renormalised = collect_routing(model, idx)
    with pruned_experts(model, pruned):
        masked = collect_routing(model, idx)
    for r, experts in zip(renormalised, pruned):  # the softmax runs over the experts that remain
        assert torch.allclose(r.probs.sum(1), torch.ones(len(r.probs)))
        assert not r.probs[:, experts].any()
    # The same experts are chosen; renormalised, each token's weights are its masked ones divided by the
    # probability the remaining experts had (what deleting the router rows does to a softmax).
    assert torch.equal(renormalised[0].expert, masked[0].expert)
    remaining = 1 - masked[0].probs[:, pruned[0]].sum(1, keepdim=True)
    assert torch.allclose(renormalised[0].weights, masked[0].weights / remaining, atol=1e-6)


def test_coactivation_counts_pairs_among_the_chosen():
    share = coactivation(torch.tensor([[0, 1], [0, 1], [0, 2], [3, 1]]), 8)
    assert share[0, 1] == pytest.approx(2 / 3) and share[0, 2] == pytest.approx(1 / 3)  # expert 0 chose 3 times
    assert share[1, 0] == pytest.approx(2 / 3) and share[1, 3] == pytest.approx(1 / 3)
    assert share[2, 0] == 1.0 and share[3, 1] == 1.0 and not share.diagonal().any() and not share[4:].any()
    assert not coactivation(torch.tensor([[0], [1], [1]]), 3).any()  # top-1: no pairs


def test_context_specialisation_is_zero_for_a_router_that_reads_only_the_token():
    token_ids = torch.arange(600) % 3
    kinds = (torch.arange(600) // 3) % 2  # every token id occurs in both kinds of text
    by_token = (token_ids * 5) % 7  # a function of the id: sorts tokens perfectly, knows nothing of context
    assert context_specialisation(token_ids, by_token, kinds) == pytest.approx(0.0, abs=1e-9)
    by_context = token_ids * 2 + kinds  # the same token goes to another expert in another context
    assert context_specialisation(token_ids, by_context, kinds) == pytest.approx(1.0)
    half = torch.where(token_ids == 0, by_context, by_token)  # only token 0 is routed by its context
    assert context_specialisation(token_ids, half, kinds) == pytest.approx(1 / 3)


def test_random_routers_change_routing_and_restore_it_even_after_an_error():
    model = modern_moe().eval()
    idx = torch.randint(0, 40, (4, 32))
    trained = collect_routing(model, idx)[0].expert.clone()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(KeyboardInterrupt):
        with random_routers(model, seed=1):
            assert not torch.equal(collect_routing(model, idx)[0].expert, trained)
            raise KeyboardInterrupt  # interrupted mid-analysis: the trained routers still come back
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
