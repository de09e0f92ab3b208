import subprocess
import sys

import pytest
import torch

from moe_tutorial.checkpoint import load_checkpoint, model_from_checkpoint
from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.model import GPT
from moe_tutorial.presets import preset
from moe_tutorial.train import TrainConfig, learning_rate_at, make_optimizer, train


def tiny(dataset, **overrides):
    model_cfg, train_cfg = preset("char-tiny", dataset.tokenizer.vocab_size, progress=False, **overrides)
    torch.manual_seed(train_cfg.seed)
    return GPT(model_cfg), train_cfg


@pytest.mark.parametrize("bad, field", [
    (dict(batch_size=0), "batch_size"),
    (dict(max_iters=-1), "max_iters"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(min_lr=1.0, learning_rate=0.1), "min_lr"),
    (dict(dtype="float16"), "dtype"),
    (dict(grad_accum_steps=0), "grad_accum_steps"),
])
def test_train_config_validation(bad, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**bad)


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(max_iters=1000, warmup_iters=100, learning_rate=1e-3, min_lr=1e-4)
    lrs = [learning_rate_at(s, cfg) for s in range(1100)]
    assert lrs[0] < lrs[50] < lrs[99] <= 1e-3
    assert max(lrs) == pytest.approx(1e-3, rel=1e-3)
    assert all(a >= b for a, b in zip(lrs[100:1000], lrs[101:1000]))  # monotone decay
    assert lrs[999] == pytest.approx(1e-4, rel=1e-3) and lrs[1050] == 1e-4


def test_weight_decay_only_on_matrices(tiny_dataset):
    model, cfg = tiny(tiny_dataset)
    decay, no_decay = make_optimizer(model, cfg).param_groups
    assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for g in (decay, no_decay) for p in g["params"])


def test_loss_falls_and_run_is_deterministic(tiny_dataset):
    model, cfg = tiny(tiny_dataset)
    history = train(model, tiny_dataset, cfg)
    assert history.val_loss[-1] < history.val_loss[0] < 3.0
    assert len(history.loss) == cfg.max_iters and history.eval_step == [25, 50]
    again, _ = tiny(tiny_dataset)
    assert train(again, tiny_dataset, cfg).loss == history.loss


def test_grad_accumulation_matches_one_big_batch(tiny_dataset):
    """Two micro-batches of 4 give the same update as the gradient of their average."""
    model, cfg = tiny(tiny_dataset, batch_size=4, grad_accum_steps=2, max_iters=1, eval_iters=1)
    big, _ = tiny(tiny_dataset)
    big.load_state_dict(model.state_dict())
    from moe_tutorial.data import get_batch

    g = torch.Generator().manual_seed(cfg.seed)
    xs, ys = zip(*(get_batch(tiny_dataset.train, 4, model.config.block_size, g) for _ in range(2)))
    train(model, tiny_dataset, cfg)
    big_cfg = TrainConfig(**{**cfg.__dict__, "batch_size": 8, "grad_accum_steps": 1})
    opt = make_optimizer(big, big_cfg)
    for group in opt.param_groups:
        group["lr"] = learning_rate_at(0, big_cfg)
    loss = big(torch.cat(xs), torch.cat(ys)).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(big.parameters(), big_cfg.grad_clip)
    opt.step()
    for a, b in zip(model.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_resume_matches_uninterrupted_run(tiny_dataset, tmp_path):
    model, cfg = tiny(tiny_dataset)
    full = train(model, tiny_dataset, cfg)

    ckpt = tmp_path / "ckpt.pt"
    first, half_cfg = tiny(tiny_dataset, max_iters=25, lr_decay_iters=50)  # interrupted at 25
    train(first, tiny_dataset, half_cfg, checkpoint_path=ckpt)
    second, _ = tiny(tiny_dataset)
    resumed = train(second, tiny_dataset, cfg, checkpoint_path=ckpt, resume=True)
    assert resumed.loss == full.loss  # bitwise: same batches, same optimizer state
    assert resumed.val_loss == full.val_loss
    for a, b in zip(model.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_resume_with_dropout_is_exact(tiny_dataset, tmp_path):
    """Dropout draws from the global RNG: the checkpoint must carry its state."""
    from moe_tutorial.presets import PRESETS

    model_kwargs = {**PRESETS["char-tiny"][0], "dropout": 0.2}
    cfg = TrainConfig(**{**PRESETS["char-tiny"][1], "progress": False})

    def fresh():
        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=tiny_dataset.tokenizer.vocab_size, **model_kwargs))

    full = train(fresh(), tiny_dataset, cfg)
    ckpt = tmp_path / "ckpt.pt"
    interrupted = TrainConfig(**{**cfg.__dict__, "max_iters": 25, "lr_decay_iters": 50})
    train(fresh(), tiny_dataset, interrupted, checkpoint_path=ckpt)
    torch.manual_seed(123)  # disturb the global RNG: the checkpoint must restore it
    resumed = train(fresh(), tiny_dataset, cfg, checkpoint_path=ckpt, resume=True)
    assert resumed.loss == full.loss


def test_checkpoint_loads_weights_only_and_rebuilds_model(tiny_dataset, tmp_path):
    model, cfg = tiny(tiny_dataset, max_iters=5, eval_interval=5)
    ckpt = tmp_path / "ckpt.pt"
    train(model, tiny_dataset, cfg, checkpoint_path=ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 5
    rebuilt = model_from_checkpoint(state)
    x = torch.randint(tiny_dataset.tokenizer.vocab_size, (1, 8))
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x)[0], rebuilt(x)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left


def test_resume_refuses_a_different_config(tiny_dataset, tmp_path):
    model, cfg = tiny(tiny_dataset, max_iters=2, eval_interval=2)
    ckpt = tmp_path / "ckpt.pt"
    train(model, tiny_dataset, cfg, checkpoint_path=ckpt)
    other = GPT(GPTConfig(**{**model.config.to_dict(), "n_embd": 64}))
    with pytest.raises(ValueError, match="n_embd"):
        train(other, tiny_dataset, cfg, checkpoint_path=ckpt, resume=True)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(bad)


def test_bf16_autocast_and_activation_checkpointing(tiny_dataset):
    """bf16 autocast learns as fp32 does (within rounding); checkpointing changes nothing."""
    fp32, cfg = tiny(tiny_dataset, max_iters=30)
    fp32_loss = train(fp32, tiny_dataset, cfg).loss
    bf16, cfg = tiny(tiny_dataset, max_iters=30, dtype="bfloat16")
    bf16_loss = train(bf16, tiny_dataset, cfg).loss
    assert bf16_loss[0] == pytest.approx(fp32_loss[0], abs=0.02)  # same start, to bf16's precision
    assert bf16_loss[-1] < fp32_loss[0] - 0.8  # it learns: ln(vocab) ~ 3.0 at the start
    assert bf16_loss[-1] == pytest.approx(fp32_loss[-1], abs=0.1)
    plain, cfg = tiny(tiny_dataset, max_iters=3, eval_interval=3)
    ckpt_model, ckpt_cfg = tiny(tiny_dataset, max_iters=3, eval_interval=3, activation_checkpointing=True)
    assert train(plain, tiny_dataset, cfg).loss == pytest.approx(
        train(ckpt_model, tiny_dataset, ckpt_cfg).loss, abs=1e-6)


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown preset"):
        preset("huge", 65)


def test_cli_trains_and_samples(tmp_path, shakespeare_file):
    from conftest import copy_into

    cache = tmp_path / "cache"
    copy_into(shakespeare_file, cache / "tinyshakespeare.txt")
    cmd = [sys.executable, "-m", "moe_tutorial.train", "--preset", "char-tiny", "--max-iters", "20",
           "--out-dir", str(tmp_path / "out"), "--sample", "50", "--no-progress", "--threads", "1"]
    env = {"MOE_TUTORIAL_DATA": str(cache), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=True).stdout
    assert "val loss" in out and (tmp_path / "out" / "ckpt.pt").exists()
    resumed = subprocess.run(cmd[:6] + ["30"] + cmd[7:] + ["--resume"], capture_output=True, text=True,
                             env=env, timeout=120, check=True).stdout
    assert "30 iters" in resumed


# --- Muon (notebook 07) -------------------------------------------------------------------------------------------

def modern_moe(tiny_dataset):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tiny_dataset.tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32,
                         norm="rmsnorm", position="rope", activation="swiglu", qk_norm="head",
                         moe=MoEConfig(n_experts=4, top_k=2, every=2)))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tiny_dataset):
    model = modern_moe(tiny_dataset)
    opt = make_optimizer(model, TrainConfig(optimizer="muon", progress=False))
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in muon}
    assert names == {n for n, p in model.named_parameters()
                     if p.dim() == 2 and n.startswith("transformer.h.") and "router" not in n}
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.0.mlp.c_fc.weight" in names
    assert not any("experts" in n or "router" in n or "wte" in n or "norm" in n for n in names)
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert muon.isdisjoint(adamw) and muon | adamw == {id(p) for p in model.parameters()}


def test_muon_resume_matches_uninterrupted_run(tiny_dataset, tmp_path):
    cfg = TrainConfig(batch_size=4, max_iters=12, eval_interval=6, eval_iters=2, warmup_iters=2,
                      optimizer="muon", progress=False)
    model = modern_moe(tiny_dataset)
    full = train(model, tiny_dataset, cfg)
    ckpt = tmp_path / "ckpt.pt"
    train(modern_moe(tiny_dataset), tiny_dataset, TrainConfig(**{**cfg.__dict__, "max_iters": 6, "lr_decay_iters": 12}),
          checkpoint_path=ckpt)
    second = modern_moe(tiny_dataset)
    resumed = train(second, tiny_dataset, TrainConfig(**{**cfg.__dict__, "lr_decay_iters": 12}), checkpoint_path=ckpt,
                    resume=True)
    assert resumed.loss[-6:] == full.loss[-6:]  # bitwise: Muon's momentum and AdamW's moments both restored
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), second.parameters()))
    with pytest.raises(ValueError, match="optimizer: checkpoint 'muon' vs now 'adamw'"):
        train(modern_moe(tiny_dataset), tiny_dataset,
              TrainConfig(**{**cfg.__dict__, "optimizer": "adamw", "max_iters": 18}), checkpoint_path=ckpt, resume=True)


def test_checkpoints_from_before_the_optimizer_option_resume_as_adamw(tiny_dataset, tmp_path):
    model, cfg = tiny(tiny_dataset, max_iters=10, lr_decay_iters=20)
    ckpt = tmp_path / "ckpt.pt"
    train(model, tiny_dataset, cfg, checkpoint_path=ckpt)
    state = torch.load(ckpt, weights_only=True)
    del state["train_config"]["optimizer"]  # as written before TrainConfig.optimizer existed
    del state["sha256"]  # ... and before checkpoints carried a checksum
    torch.save(state, ckpt)
    resumed_model, resumed_cfg = tiny(tiny_dataset, max_iters=20, lr_decay_iters=20)
    history = train(resumed_model, tiny_dataset, resumed_cfg, checkpoint_path=ckpt, resume=True)
    assert len(history.loss) == 20
