import pytest
import torch

from moe_tutorial.config import GPTConfig
from moe_tutorial.model import GPT
from moe_tutorial.sampling import filter_logits, sample_next_token

SMALL = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16)


@pytest.mark.parametrize("bad, field", [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-3), "vocab_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
])
def test_config_validation_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**SMALL, **bad})


def test_forward_shapes_and_loss():
    model = GPT(GPTConfig(**SMALL))
    idx = torch.randint(11, (3, 16))
    logits, loss = model(idx, idx)[:2]
    assert logits.shape == (3, 16, 11)
    assert abs(loss.item() - torch.log(torch.tensor(11.0)).item()) < 0.3  # ~uniform at init
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_weight_tying_and_scaled_init():
    model = GPT(GPTConfig(**{**SMALL, "n_layer": 8, "n_embd": 64, "n_head": 4}))
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h])
    fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.h])
    assert abs(fc.std().item() - 0.02) < 0.002
    assert abs(proj.std().item() - 0.02 / (2 * 8) ** 0.5) < 0.001


def test_causality():
    model = GPT(GPTConfig(**SMALL)).eval()
    idx = torch.randint(11, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 11
    with torch.no_grad():
        a = model(idx).logits
        b = model(changed).logits
    assert torch.equal(a[:, :7], b[:, :7])  # positions before 7 cannot see token 7
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_generate_is_reproducible_under_a_seed():
    model = GPT(GPTConfig(**SMALL)).eval()
    start = torch.zeros(2, 1, dtype=torch.long)

    def run(seed):
        return model.generate(start, 30, temperature=0.9, top_k=5, top_p=0.9,
                              generator=torch.Generator().manual_seed(seed))

    out = run(1)
    assert out.shape == (2, 31)
    assert torch.equal(out, run(1))
    assert not torch.equal(out, run(2))


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sample_next_token(torch.zeros(1, 5), **kwargs)


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum() == 2
    kept = torch.isfinite(filter_logits(logits, top_p=0.75))
    assert kept.tolist() == [[True, True, False, False, False]]  # 0.5 + 0.3 reaches 0.75
    assert torch.isfinite(filter_logits(logits, top_p=0.4)).sum() == 1  # the top token always stays
    # greedy through top_k=1: always the argmax
    ids = sample_next_token(logits.repeat(4, 1), top_k=1, generator=torch.Generator().manual_seed(0))
    assert ids.flatten().tolist() == [0, 0, 0, 0]


def test_an_expert_choice_model_refuses_to_generate_saying_why():
    """Expert choice ranks the whole batch: one decoded token would be picked by every expert
    (capacity 1 each), not what the model trained with. generate() refuses instead of diverging."""
    from moe_tutorial.config import MoEConfig

    model = GPT(GPTConfig(**SMALL, moe=MoEConfig(n_experts=4, top_k=2, routing="expert_choice"))).eval()
    with pytest.raises(ValueError, match="expert choice, which is not causal"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2)
