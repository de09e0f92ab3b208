"""Muon for the experts' stacked weights (TrainConfig.muon_experts): the batched update is torch's
Muon on each expert's matrix, the optimizer takes the right parameters, and checkpoints resume."""

import pytest
import torch

from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.model import GPT
from moe_tutorial.optimizers import ExpertMuon, MuonWithAdamW
from moe_tutorial.train import TrainConfig, make_optimizer, train

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs PyTorch >= 2.9")


@pytest.mark.parametrize("adjust_lr_fn", ["match_rms_adamw", None])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(3, 48, 24), (3, 24, 48)], ids=["tall", "wide"])
def test_batched_update_is_torchs_muon_on_each_expert(shape, dtype, nesterov, adjust_lr_fn):
    stacked = torch.nn.Parameter(torch.randn(shape, dtype=dtype) * 0.02)  # (E, A, B)
    alone = [torch.nn.Parameter(w.detach().clone()) for w in stacked]  # E matrices (A, B)
    hyper = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    batched, reference = ExpertMuon([stacked], **hyper), torch.optim.Muon(alone, **hyper)
    for _ in range(3):  # momentum builds up over the steps
        grad = torch.randn(shape, dtype=dtype)
        stacked.grad = grad.clone()
        for p, g in zip(alone, grad):
            p.grad = g.clone()
        batched.step()
        reference.step()
    expected = torch.stack([p.detach() for p in alone])
    assert (stacked.detach() - expected).abs().max() <= 1e-6  # in practice 0: the same bf16 matmuls, batched
    for buf, p in zip(batched.state[stacked]["momentum_buffer"], alone):
        torch.testing.assert_close(buf, reference.state[p]["momentum_buffer"], atol=0, rtol=0)


def test_expert_muon_takes_only_stacked_weights():
    with pytest.raises(ValueError, match="stacked expert weights"):
        ExpertMuon([torch.nn.Parameter(torch.zeros(4, 4))])


def moe_with_shared_experts(vocab_size, bias=False):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=bias,
                         norm="rmsnorm", position="rope", activation="swiglu", qk_norm="head",
                         moe=MoEConfig(n_experts=4, top_k=2, every=2, n_shared_experts=1)))


def test_muon_experts_gives_expert_weights_to_expert_muon(tiny_dataset):
    model = moe_with_shared_experts(tiny_dataset.tokenizer.vocab_size, bias=True)  # expert biases: AdamW
    opt = make_optimizer(model, TrainConfig(optimizer="muon", muon_experts=True, progress=False))
    names = {id(p): name for name, p in model.named_parameters()}
    held = {part: {names[id(p)] for g in o.param_groups for p in g["params"]} for part, o in opt.parts.items()}
    expert_weights = {n for n in names.values() if n.endswith(("experts.c_fc", "experts.c_proj", "shared.c_fc",
                                                                "shared.c_proj"))}
    assert len(expert_weights) == 4 and held["expert_muon"] == expert_weights  # routed and shared, one MoE layer
    assert held["muon"] == {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("transformer.h.")
                            and not any(s in n for s in (".router.", ".experts.", ".shared."))}
    assert "transformer.h.0.attn.c_attn.weight" in held["muon"] and "transformer.h.0.mlp.c_fc.weight" in held["muon"]
    assert {"transformer.wte.weight", "transformer.h.1.mlp.router.gate.weight",
            "transformer.h.1.mlp.experts.b_fc"} <= held["adamw"]
    assert sum(map(len, held.values())) == len(names) and set().union(*held.values()) == set(names.values())


def test_muon_experts_changes_nothing_for_a_dense_model(tiny_dataset):
    torch.manual_seed(0)
    dense = GPT(GPTConfig(vocab_size=tiny_dataset.tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    opt = make_optimizer(dense, TrainConfig(optimizer="muon", muon_experts=True, progress=False))
    assert set(opt.parts) == {"muon", "adamw"}  # its MLPs' matrices are in Muon already


def test_muon_experts_needs_muon():
    with pytest.raises(ValueError, match="muon_experts=True .* needs optimizer='muon'"):
        TrainConfig(muon_experts=True)
    with pytest.raises(ValueError, match="muon_experts must be True or False"):
        TrainConfig(optimizer="muon", muon_experts="yes")


RECIPE = dict(batch_size=4, max_iters=12, eval_interval=6, eval_iters=2, warmup_iters=2, optimizer="muon",
              progress=False)


def half_run(tiny_dataset, ckpt, **overrides):
    """The first 6 of 12 steps, checkpointed at step 6."""
    cfg = TrainConfig(**{**RECIPE, "max_iters": 6, "lr_decay_iters": 12, **overrides})
    train(moe_with_shared_experts(tiny_dataset.tokenizer.vocab_size), tiny_dataset, cfg, checkpoint_path=ckpt)


def test_muon_experts_resume_matches_uninterrupted_run(tiny_dataset, tmp_path):
    cfg = TrainConfig(**RECIPE, muon_experts=True)
    model = moe_with_shared_experts(tiny_dataset.tokenizer.vocab_size)
    full = train(model, tiny_dataset, cfg)
    ckpt = tmp_path / "ckpt.pt"
    half_run(tiny_dataset, ckpt, muon_experts=True)
    assert set(torch.load(ckpt, weights_only=True)["optimizer"]) == {"muon", "adamw", "expert_muon"}
    second = moe_with_shared_experts(tiny_dataset.tokenizer.vocab_size)
    resumed = train(second, tiny_dataset, TrainConfig(**{**cfg.__dict__, "lr_decay_iters": 12}), checkpoint_path=ckpt,
                    resume=True)
    assert resumed.loss[-6:] == full.loss[-6:]  # bitwise: the experts' momentum buffers restored too
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), second.parameters()))


def test_resuming_with_another_muon_experts_is_refused(tiny_dataset, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    half_run(tiny_dataset, ckpt)  # muon_experts=False
    model = moe_with_shared_experts(tiny_dataset.tokenizer.vocab_size)
    with pytest.raises(ValueError, match=r"muon_experts: checkpoint False vs now True") as err:
        train(model, tiny_dataset, TrainConfig(**RECIPE, lr_decay_iters=12, muon_experts=True), checkpoint_path=ckpt,
              resume=True)
    assert "\n" not in str(err.value)
    saved = torch.load(ckpt, weights_only=True)["optimizer"]  # the optimizer's own check, for direct loads
    opt = make_optimizer(model, TrainConfig(**RECIPE, muon_experts=True))
    with pytest.raises(ValueError, match="trained with muon_experts=False; resume with TrainConfig.muon_experts=False"):
        opt.load_state_dict(saved)


def test_checkpoints_from_before_muon_experts_resume_with_it_off(tiny_dataset, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    half_run(tiny_dataset, ckpt)
    state = torch.load(ckpt, weights_only=True)
    del state["train_config"]["muon_experts"]  # as written before TrainConfig.muon_experts existed
    del state["sha256"]
    torch.save(state, ckpt)
    assert set(state["optimizer"]) == {"muon", "adamw"}
    history = train(moe_with_shared_experts(tiny_dataset.tokenizer.vocab_size), tiny_dataset,
                    TrainConfig(**RECIPE, lr_decay_iters=12), checkpoint_path=ckpt, resume=True)
    assert len(history.loss) == 12


def test_muon_with_adamw_steps_all_three():
    expert = torch.nn.Parameter(torch.randn(2, 8, 4))
    matrix, vector = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))
    opt = MuonWithAdamW(torch.optim.Muon([matrix]), torch.optim.AdamW([vector]), ExpertMuon([expert]))
    before = [p.detach().clone() for p in (expert, matrix, vector)]
    for p in (expert, matrix, vector):
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, (expert, matrix, vector)))
    assert len(opt.param_groups) == 3
    opt.zero_grad()
    assert all(p.grad is None for p in (expert, matrix, vector))


@pytest.mark.parametrize("flags, expected", [([], True), (["--no-muon-experts"], False)])
def test_char_modern_trains_its_experts_with_muon_unless_told_not_to(tmp_path, shakespeare_file, monkeypatch,
                                                                     flags, expected):
    """The char-modern preset's MoE variants get Muon for the experts (what made the modern MoE beat
    the modern dense model, benchmarks/modern_moe.py); --no-muon-experts gives them AdamW."""
    from conftest import copy_into

    from moe_tutorial.cli import main

    copy_into(shakespeare_file, tmp_path / "cache" / "tinyshakespeare.txt")
    monkeypatch.setenv("MOE_TUTORIAL_DATA", str(tmp_path / "cache"))
    main(["--preset", "char-modern", "--variant", "fine-grained + shared", "--max-iters", "2", "--batch-size", "2",
          "--sample", "0", "--no-progress", "--threads", "1", "--out-dir", str(tmp_path / "out"), *flags])
    state = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert state["train_config"]["muon_experts"] is expected
    assert ("expert_muon" in state["optimizer"]) is expected
    assert state["model_config"]["moe"]["expert_hidden"] == 84  # SwiGLU's width: 4 active x 84 = dense 336
