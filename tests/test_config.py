"""Configs: MoE options in one validated dataclass, kernels outside the config, one diff for
resume and distributed checks, and files written before the redesign still load."""

import json

import pytest
import torch

from moe_tutorial.checkpoint import check_compatible, load_checkpoint
from moe_tutorial.config import GPTConfig, MoEConfig, config_diff
from moe_tutorial.model import GPT, Kernels
from moe_tutorial.pretrained import from_pretrained, save_pretrained
from moe_tutorial.train import TrainConfig, train

# What GPTConfig.to_dict() wrote before MoEConfig existed (config version 1): MoE options and
# kernel names flat in the model config.
V1_FLAT = dict(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=False,
               attn_impl="naive", gelu_approximate="none", n_experts=4, top_k=2, moe_every=2, expert_hidden=24,
               capacity_factor_train=1.5, capacity_factor_eval=2.0, aux_loss_coef=0.02, z_loss_coef=1e-3,
               router_jitter=0.1, router_type="token_choice", noisy_gating=False, second_expert_policy="random",
               n_shared_experts=1, bias_update_rate=0.0, dispatch="einsum", straight_through_gate=False)
V1_AS_V2 = GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, moe=MoEConfig(
    n_experts=4, top_k=2, every=2, expert_hidden=24, capacity_factor_train=1.5, aux_loss_coef=0.02, jitter=0.1,
    second_expert="random", n_shared_experts=1))


def test_a_version_1_config_dict_converts_field_by_field():
    assert GPTConfig.from_dict(V1_FLAT) == V1_AS_V2
    dense = {k: v for k, v in V1_FLAT.items()} | {"n_experts": None}
    assert GPTConfig.from_dict(dense).moe is None


def test_config_round_trips_through_a_dict():
    assert GPTConfig.from_dict(V1_AS_V2.to_dict()) == V1_AS_V2
    assert isinstance(GPTConfig(**V1_AS_V2.to_dict()).moe, MoEConfig)


def test_a_version_1_checkpoint_resumes(tiny_dataset, tmp_path):
    config = GPTConfig(vocab_size=tiny_dataset.tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16,
                       moe=MoEConfig(n_experts=4, top_k=2, every=2))
    cfg = TrainConfig(batch_size=2, max_iters=2, eval_interval=2, eval_iters=1, progress=False)
    train(GPT(config), tiny_dataset, cfg, checkpoint_path=tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    flat = {k: v for k, v in state["model_config"].items() if k not in ("moe", "mlp_hidden", "tie_embeddings")}
    moe = state["model_config"]["moe"]
    flat |= dict(n_experts=moe["n_experts"], top_k=moe["top_k"], moe_every=moe["every"], attn_impl="sdpa",
                 dispatch="sort", router_type="token_choice", second_expert_policy="all", router_jitter=0.0)
    del state["config_version"], state["sha256"]  # version 1 checkpoints carried no checksum
    state["model_config"] = flat
    torch.save(state, tmp_path / "ckpt.pt")
    history = train(GPT(config), tiny_dataset, TrainConfig(**{**cfg.__dict__, "max_iters": 4}),
                    checkpoint_path=tmp_path / "ckpt.pt", resume=True)
    assert history.step == [0, 1, 2, 3]
    assert load_checkpoint(tmp_path / "ckpt.pt")["config_version"] == 2  # rewritten in today's layout


def test_a_version_1_save_pretrained_directory_loads(tmp_path):
    model = GPT(V1_AS_V2).eval()
    save_pretrained(model, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"moe_tutorial": V1_FLAT}))  # as written before
    loaded = from_pretrained(tmp_path / "m").eval()
    assert loaded.config == V1_AS_V2
    idx = torch.randint(0, 40, (2, 16))
    assert torch.equal(loaded(idx).logits, model(idx).logits)


def test_config_diff_names_nested_fields():
    other = GPTConfig(**{**V1_AS_V2.to_dict(), "n_embd": 32, "moe": {**V1_AS_V2.moe.__dict__, "top_k": 3}})
    assert config_diff(V1_AS_V2.to_dict(), other.to_dict()) == {"moe.top_k": (2, 3), "n_embd": (16, 32)}
    dense = GPTConfig(**{**V1_AS_V2.to_dict(), "moe": None})
    assert set(config_diff(V1_AS_V2.to_dict(), dense.to_dict())) == {"moe"}


def test_kernels_are_not_part_of_a_resume_check(tiny_dataset, tmp_path):
    config = GPTConfig(vocab_size=tiny_dataset.tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16,
                       moe=MoEConfig(n_experts=2))
    cfg = TrainConfig(batch_size=2, max_iters=1, eval_interval=1, eval_iters=1, progress=False)
    train(GPT(config, Kernels(attention="naive", dispatch="loop")), tiny_dataset, cfg,
          checkpoint_path=tmp_path / "ckpt.pt")
    check_compatible(GPT(config, Kernels(attention="flash", dispatch="einsum")),
                     load_checkpoint(tmp_path / "ckpt.pt"))  # no error: same architecture


@pytest.mark.parametrize("kernel", ["naive", "flash"])
@pytest.mark.parametrize("dispatch", ["einsum", "loop"])
def test_kernels_change_nothing_but_speed(kernel, dispatch):
    torch.manual_seed(0)
    model = GPT(V1_AS_V2).eval()
    idx = torch.randint(0, 40, (2, 16))
    reference = model(idx).logits
    model.use_kernels(Kernels(attention=kernel, dispatch=dispatch))
    torch.testing.assert_close(model(idx).logits, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fields, words", [
    (dict(n_experts=0), "n_experts must be a positive integer"),
    (dict(n_experts=4, top_k=5), "top_k=5 must be at most n_experts=4"),
    (dict(every=0), "every must be a positive integer"),
    (dict(capacity_factor_train=0.0), "capacity_factor_train must be > 0"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef must be >= 0"),
    (dict(routing="sinkhorn"), "routing must be one of"),
    (dict(second_expert="best"), "second_expert must be one of"),
    (dict(top_k=2, straight_through_gate=True), "top-1 token choice only"),
    (dict(n_shared_experts=-1), "n_shared_experts must be an integer >= 0"),
    (dict(expert_hidden=0), "expert_hidden must be a positive integer"),
    (dict(routing="expert_choice", bias_update_rate=0.01), "load is balanced already"),
    (dict(second_expert="random", top_k=1), "needs top_k >= 2"),
])
def test_moe_config_validates_every_field(fields, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        MoEConfig(**fields)


def test_impossible_combinations_are_refused_in_one_line():
    with pytest.raises(ValueError, match="every=4 is more than n_layer=2"):
        GPTConfig(n_layer=2, moe=MoEConfig(every=4))
    with pytest.raises(ValueError, match="config.json: .*not supported between"):
        GPTConfig.from_dict({**V1_AS_V2.to_dict(), "moe": {"capacity_factor_train": "1.25"}}, "config.json")


def test_resuming_with_another_recipe_is_refused(tiny_dataset, tmp_path):
    config = GPTConfig(vocab_size=tiny_dataset.tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    cfg = TrainConfig(batch_size=2, max_iters=2, eval_interval=2, eval_iters=1, progress=False)
    train(GPT(config), tiny_dataset, cfg, checkpoint_path=tmp_path / "ckpt.pt")
    other = TrainConfig(**{**cfg.__dict__, "max_iters": 4, "learning_rate": 5e-3, "batch_size": 3})
    with pytest.raises(ValueError, match="another recipe .*batch_size: checkpoint 2 vs now 3"):
        train(GPT(config), tiny_dataset, other, checkpoint_path=tmp_path / "ckpt.pt", resume=True)
    longer = TrainConfig(**{**cfg.__dict__, "max_iters": 4})
    with pytest.warns(UserWarning, match="schedule stretched from 2 to 4 steps"):
        train(GPT(config), tiny_dataset, longer, checkpoint_path=tmp_path / "ckpt.pt", resume=True)


def test_a_dense_config_has_no_moe_options_to_misspell():
    with pytest.raises(TypeError):
        GPTConfig(n_experts=4)  # MoE options live in MoEConfig only
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({**GPTConfig().to_dict(), "n_experts": 4, "moe": None})


def test_flash_attention_with_dropout_is_refused_when_the_model_is_built():
    with pytest.raises(ValueError, match="does not implement attention dropout"):
        GPT(GPTConfig(dropout=0.1), Kernels(attention="flash"))
    with pytest.raises(ValueError, match="Kernels.dispatch must be one of"):
        Kernels(dispatch="scatter")


def test_moe_variants_keep_the_dense_models_compute_per_token():
    """Every MoE variant of the char and char-modern presets (the CLI's --variant) uses as many
    parameters per token as the dense model, up to its routers: the comparison the experts sweep made."""
    from moe_tutorial.costs import model_info
    from moe_tutorial.presets import MOE_VARIANTS, preset

    for recipe in ("char", "char-modern"):  # char-modern's SwiGLU experts are 2/3 as wide (presets.swiglu_width)
        dense = model_info(preset(recipe, 65)[0]).active_params
        for name in MOE_VARIANTS:
            config = preset(recipe, 65, variant=name)[0]
            info = model_info(config)
            assert dense <= info.active_params <= 1.03 * dense, (recipe, name)
            if config.moe is not None:
                assert all(config.is_moe_layer(i) for i in range(config.n_layer)), name  # MoE in every block
                assert info.total_params > 2 * dense, name
