"""Bad input and hostile files: each is refused with one line that names the problem and the fix,
nothing half-written is left on disk, and nothing a user trained is lost."""

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import copy_into
from local_server import LocalServer, closed_port_url

from moe_tutorial import data, pretrained
from moe_tutorial.checkpoint import load_checkpoint, save_checkpoint
from moe_tutorial.cli import main
from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.downloads import atomic_path, download, remove_stale_temporaries, writer_tag
from moe_tutorial.experts import grouped_mm_supported, per_expert_matmul
from moe_tutorial.history import History
from moe_tutorial.model import GPT
from moe_tutorial.moe import MoE
from moe_tutorial.pretrained import from_pretrained, save_pretrained
from moe_tutorial.router import Router, capacity
from moe_tutorial.train import TrainConfig, train

# --- GPT-2 checkpoints from transformers: every GPT2Config option honoured exactly or refused ---------------

TINY = dict(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4)


def gpt2_config(**options):
    transformers = pytest.importorskip("transformers")  # only these tests need it: the others run without
    return transformers.GPT2Config(**TINY, **options)


def hf_gpt2(**options):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(**options)).eval()
    with torch.no_grad():  # non-zero biases and norms, so a mapping mistake cannot hide
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        if not model.config.tie_word_embeddings:
            model.lm_head.weight.normal_()  # an output layer unlike the embedding
    return model


@pytest.mark.parametrize("options", [
    dict(tie_word_embeddings=False), dict(n_inner=72), dict(activation_function="gelu"),
    dict(activation_function="gelu_pytorch_tanh"), dict(activation_function="gelu_fast"),
    dict(resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2), dict(reorder_and_upcast_attn=True),
    dict(summary_type="mean", initializer_range=0.5, use_cache=False),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_gpt2_options_that_load_give_transformers_logits(tmp_path, options):
    hf = hf_gpt2(**options)
    hf.save_pretrained(tmp_path / "m", safe_serialization=True)
    model = from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)
    if "resid_pdrop" in options:
        assert model.config.dropout == 0.2  # honoured for training too, not only at eval
    if options.get("tie_word_embeddings") is False:
        assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("options, named", [
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon=1e-06"),
    (dict(scale_attn_weights=False), "scale_attn_weights=False"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(resid_pdrop=0.1, embd_pdrop=0.0, attn_pdrop=0.1), "embd_pdrop=0.0"),
    (dict(add_cross_attention=True), "add_cross_attention=True"),
    (dict(architectures=["GPT2ForSequenceClassification"]), "GPT2ForSequenceClassification"),
])
def test_gpt2_options_that_would_change_outputs_are_refused(tmp_path, options, named):
    config = json.loads(gpt2_config().to_json_string())
    config.update(options)
    with pytest.raises(ValueError, match="does not implement") as err:
        pretrained.gpt2_config_from_hf(config)
    assert named in str(err.value)


def test_unknown_config_fields_are_named_with_both_ways_forward(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path / "m", safe_serialization=True)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(note="trained by me", rotary_dim=16)  # a harmless note, and an option GPT-2 does not have
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        from_pretrained(tmp_path / "m")
    message = str(err.value)
    assert "does not know: ['note', 'rotary_dim']" in message and "Remove them" in message
    assert "allow_unknown_fields=['note', 'rotary_dim']" in message and "would give different" not in message
    with pytest.raises(ValueError, match=r"does not know: \['rotary_dim'\]"):
        from_pretrained(tmp_path / "m", allow_unknown_fields={"note"})
    model = from_pretrained(tmp_path / "m", allow_unknown_fields={"note", "rotary_dim"}).eval()
    idx = torch.randint(0, 97, (1, 16))
    torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_unknown_fields_of_a_llama_family_config_can_be_vouched_for(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "note": "mine"}))
    with pytest.raises(ValueError, match=r"llama config.json has field\(s\) this loader does not know: \['note'\]"):
        from_pretrained(tmp_path / "m")
    assert from_pretrained(tmp_path / "m", allow_unknown_fields=["note"], dtype=torch.float32).config.n_embd == 32


def test_untied_checkpoint_round_trips_through_save_pretrained(tmp_path):
    hf = hf_gpt2(tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = from_pretrained(tmp_path / "hf").eval()
    save_pretrained(model, tmp_path / "ours")
    again = from_pretrained(tmp_path / "ours").eval()
    idx = torch.randint(0, 97, (1, 16))
    assert torch.equal(model(idx)[0], again(idx)[0])


# --- cached GPT-2 weights are verified every time they are used --------------------------------------------

@pytest.fixture
def tiny_hub(monkeypatch, data_cache, tmp_path):
    """A tiny GPT-2 served like the Hub under the name 'tiny-gpt2', and a way to serve it."""
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path / "saved", safe_serialization=True)
    served = tmp_path / "hub" / "test/tiny-gpt2" / "resolve" / "main"
    served.mkdir(parents=True)
    weights = (tmp_path / "saved" / "model.safetensors").read_bytes()
    (served / "model.safetensors").write_bytes(weights)
    monkeypatch.setitem(pretrained.HUB_REPOS, "tiny-gpt2", "test/tiny-gpt2")
    config = pretrained.gpt2_config_from_hf(hf.config.to_dict())
    monkeypatch.setattr(pretrained, "gpt2_config", lambda name: config)
    sha = hashlib.sha256(weights).hexdigest()
    return LocalServer(tmp_path / "hub", headers={"X-Linked-Etag": f'"{sha}"'}), sha


def zeros_like_file(path):
    from safetensors.torch import load_file, save_file

    save_file({k: torch.zeros_like(v) for k, v in load_file(path).items()}, path)


def test_a_swapped_cached_checkpoint_is_refused(tiny_hub, monkeypatch):
    server, sha = tiny_hub
    with server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        from_pretrained("tiny-gpt2", progress=False)
    cached = pretrained.cache_path("tiny-gpt2")
    assert pretrained.sha256_record(cached).read_text().strip() == sha  # recorded at download
    zeros_like_file(cached)  # right names and shapes, wrong numbers
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url(""))
    with pytest.raises(ValueError, match="is not the file that was downloaded"):
        from_pretrained("tiny-gpt2", progress=False)


def test_a_cached_checkpoint_without_a_record_is_checked_against_the_hub(tiny_hub, monkeypatch):
    server, sha = tiny_hub
    with server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        from_pretrained("tiny-gpt2", progress=False)
        record = pretrained.sha256_record(pretrained.cache_path("tiny-gpt2"))
        record.unlink()
        from_pretrained("tiny-gpt2", progress=False)  # online: verified against the Hub, record rewritten
        assert record.read_text().strip() == sha
    record.unlink()
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url(""))
    with pytest.raises(ValueError, match="cannot be verified"):
        from_pretrained("tiny-gpt2", progress=False)


# --- model directories: truncated files, bad JSON, misspelt fields, shapes that disagree -------------------

@pytest.fixture
def saved_dir(tmp_path):
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16))
    return save_pretrained(model, tmp_path / "m")


def test_truncated_safetensors_is_refused(saved_dir):
    weights = saved_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="does not match the sha256 recorded"):
        from_pretrained(saved_dir)
    (saved_dir / "model.safetensors.sha256").unlink()  # without the record: still refused, as unreadable
    with pytest.raises(ValueError, match="not a readable safetensors file") as err:
        from_pretrained(saved_dir)
    assert str(weights) in str(err.value)


def test_save_pretrained_records_the_weights_sha256(saved_dir):
    record = saved_dir / "model.safetensors.sha256"
    assert record.read_text().strip() == hashlib.sha256((saved_dir / "model.safetensors").read_bytes()).hexdigest()


def test_damaged_weights_of_a_saved_model_are_refused(saved_dir):
    """64 bytes overwritten inside a tensor: right names, shapes and dtypes, wrong numbers."""
    weights = saved_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-200:-136] = os.urandom(64)  # inside the last tensor's data, past the header
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the sha256 recorded in model.safetensors.sha256") as err:
        from_pretrained(saved_dir)
    assert str(weights) in str(err.value) and "save the model again" in str(err.value)
    (saved_dir / "model.safetensors.sha256").unlink()  # a folder with no record (as transformers writes) loads
    assert isinstance(from_pretrained(saved_dir), GPT)


def tensors_with_one_cast(path, dtype):
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    name = "transformer.h.0.mlp.c_fc.weight"
    state[name] = (state[name] * 100).to(dtype)  # what a damaged or foreign file could hold
    save_file(state, path)
    return name


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_weights_stored_as_integers_or_booleans_are_refused(saved_dir, dtype):
    (saved_dir / "model.safetensors.sha256").unlink()  # not damage on disk: a file written that way
    name = tensors_with_one_cast(saved_dir / "model.safetensors", dtype)
    with pytest.raises(ValueError, match=f"{name} is stored as {dtype}, but weights are floating point"):
        from_pretrained(saved_dir)


def test_half_precision_weights_still_load_as_float32(saved_dir):
    (saved_dir / "model.safetensors.sha256").unlink()
    tensors_with_one_cast(saved_dir / "model.safetensors", torch.bfloat16)
    assert from_pretrained(saved_dir).transformer.h[0].mlp.c_fc.weight.dtype == torch.float32


def test_llama_family_weights_of_the_wrong_dtype_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(torch.int64)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="up_proj.weight is stored as torch.int64"):
        from_pretrained(tmp_path / "m")


def test_from_pretrained_on_a_training_out_dir_says_how_to_load_it(cli, tmp_path):
    assert cli()[0] == 0
    with pytest.raises(FileNotFoundError, match="holds a training checkpoint \\(ckpt.pt\\), not a saved model") as err:
        from_pretrained(tmp_path / "out")
    assert "model_from_checkpoint(load_checkpoint(" in str(err.value) and "save_pretrained" in str(err.value)


def test_config_that_is_not_json_is_refused(saved_dir):
    (saved_dir / "config.json").write_text('{"moe_tutorial": {"n_layer": 2,')
    with pytest.raises(ValueError, match="is not valid JSON") as err:
        from_pretrained(saved_dir)
    assert "line 1" in str(err.value)


def test_misspelt_config_field_is_named_with_a_suggestion(saved_dir):
    config = json.loads((saved_dir / "config.json").read_text())
    config["moe_tutorial"]["n_embed"] = config["moe_tutorial"].pop("n_embd")
    (saved_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'n_embed' \\(did you mean 'n_embd'\\?\\)"):
        from_pretrained(saved_dir)


def test_weights_that_disagree_with_the_config_name_tensor_shapes_and_file(saved_dir):
    config = json.loads((saved_dir / "config.json").read_text())
    config["moe_tutorial"]["vocab_size"] = 41
    (saved_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        from_pretrained(saved_dir)
    message = str(err.value)
    assert "transformer.wte.weight has shape (40, 16) in the file but (41, 16) in the config" in message
    assert str(saved_dir / "model.safetensors") in message


# --- generate() with prompts it cannot use ------------------------------------------------------------------

@pytest.mark.parametrize("prompt, words", [
    (torch.zeros(1, 0, dtype=torch.long), "at least one token"),
    (torch.tensor([1, 2, 3]), "shape (batch, time)"),
    (torch.tensor([[1, 2, 40]]), "[0, 40)"),
    (torch.tensor([[-1, 2]]), "[0, 40)"),
    (torch.tensor([[1.0, 2.0]]), "integer token ids"),
])
def test_generate_refuses_prompts_it_cannot_use(prompt, words):
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError) as err:
        model.generate(prompt, 3)
    assert words in str(err.value)


def test_generate_refuses_a_negative_number_of_tokens():
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.tensor([[1]]), -1)


# --- MoE arithmetic and dtypes --------------------------------------------------------------------------------

@pytest.mark.parametrize("cf, k, n, e, expected", [
    (1.1, 1, 50, 1, 55), (1.25, 1, 768, 8, 120), (1.0, 1, 10, 3, 4), (0.1, 3, 10, 1, 3), (2.0, 2, 7, 4, 7),
    (1.2, 1, 5, 1, 6), (0.7, 1, 10, 1, 7),
])
def test_capacity_is_exact(cf, k, n, e, expected):
    # Each case is ceil(p/q) of the factor as written; several are one slot high in floating point.
    assert capacity(n, e, cf, k) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
def test_moe_layer_runs_in_every_float_dtype(dtype):
    config = GPTConfig(n_embd=16, n_head=2, bias=True, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=24))
    layer = MoE(config).to(dtype)
    x = torch.randn(2, 8, 16, dtype=dtype, requires_grad=True)
    y, _, _ = layer(x)
    y.float().sum().backward()
    assert y.dtype == dtype and x.grad is not None and torch.isfinite(x.grad.float()).all()
    reference = MoE(config).double()
    reference.load_state_dict(layer.state_dict())
    expected, _, _ = reference(x.detach().double())
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 5e-2)
    torch.testing.assert_close(y.double(), expected, atol=tolerance, rtol=tolerance)


def test_grouped_mm_probe_does_not_depend_on_the_callers_mode():
    """A first MoE forward under no_grad (evaluation, generation) must not switch grouped_mm off."""
    grouped_mm_supported.cache_clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        under_no_grad = grouped_mm_supported("cpu", torch.float32)
    grouped_mm_supported.cache_clear()
    assert under_no_grad == grouped_mm_supported("cpu", torch.float32) is True


def test_grouped_mm_support_is_asked_of_the_backend():
    # float64 is not a grouped_mm dtype on CPU: the layer must have used the per-expert fallback above.
    assert not grouped_mm_supported("cpu", torch.float64)
    x, w, counts = torch.randn(6, 8), torch.randn(3, 8, 4), torch.tensor([1, 3, 2])
    expected = torch.cat([x[:1] @ w[0], x[1:4] @ w[1], x[4:] @ w[2]])
    torch.testing.assert_close(per_expert_matmul(x, w, counts), expected)


def test_aux_loss_free_bias_counts_every_micro_batch(tiny_dataset):
    """With gradient accumulation the bias moves by the load of the whole step, not the last micro-batch."""
    config = GPTConfig(vocab_size=tiny_dataset.tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2,
                       n_embd=16, moe=MoEConfig(n_experts=4, aux_loss_coef=0.0, bias_update_rate=0.01))
    torch.manual_seed(0)
    model = GPT(config)
    router = model.moe_layers()[0].router
    seen = []
    original = router.forward

    def spy(x, capacity_factor, **options):
        routing = original(x, capacity_factor, **options)
        seen.append(torch.bincount(routing.expert.reshape(-1), minlength=4).float())
        return routing

    router.forward = spy
    cfg = TrainConfig(batch_size=4, max_iters=1, grad_accum_steps=3, eval_interval=1, eval_iters=1,
                      warmup_iters=0, progress=False)
    train(model, tiny_dataset, cfg)
    step_load = torch.stack(seen[:3]).sum(0)  # the 3 training micro-batches (evaluation runs after the step)
    expected = 0.01 * torch.sign(step_load.mean() - step_load)
    torch.testing.assert_close(router.selection_bias, expected)


def test_bias_update_uses_the_load_of_all_micro_batches():
    router = Router(2, MoEConfig(n_experts=2, top_k=1, bias_update_rate=0.01))
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # x[0] > 0: expert 0, else expert 1
    router(torch.tensor([[1.0, 0.0]]).repeat(10, 1), capacity_factor=10.0)  # 10 tokens to expert 0
    router(torch.tensor([[-1.0, 0.0]]).repeat(3, 1), capacity_factor=10.0)  # then 3 to expert 1
    router.update_selection_bias()
    # The step's load is [10, 3]: expert 0 was busier. The last micro-batch alone ([0, 3]) says the opposite.
    assert router.selection_bias.tolist() == pytest.approx([-0.01, 0.01])
    assert router.load_since_update.sum() == 0  # counted from zero again for the next step


# --- leftovers and slow servers ---------------------------------------------------------------------------------

def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_writes_are_cleaned_up_on_the_next_write(tmp_path, tiny_dataset):
    ckpt = tmp_path / "ckpt.pt"
    stale = tmp_path / f"ckpt.pt.{writer_tag(dead_pid())}.x1y2z3.tmp"
    live = tmp_path / f"ckpt.pt.{writer_tag()}.abcdef.tmp"  # a writer that is still running
    elsewhere = tmp_path / f"ckpt.pt.other_machine-{dead_pid()}.abcdef.tmp"  # its process: not ours to judge
    elsewhere.write_bytes(b"being written on another machine")
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    model = GPT(GPTConfig(vocab_size=tiny_dataset.tokenizer.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8))
    cfg = TrainConfig(max_iters=1, progress=False)
    save_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()), 1, cfg, History(), torch.Generator())
    assert ckpt.exists() and not stale.exists() and live.exists() and elsewhere.exists()
    assert remove_stale_temporaries(ckpt, ".tmp") == []


def test_a_killed_download_leaves_no_part_file_after_the_next_one(tmp_path, shakespeare_file, data_cache):
    data_cache.mkdir(parents=True)
    stale = data_cache / f"t.txt.{writer_tag(dead_pid())}.abcdef.part"
    stale.write_bytes(b"first 100 kB of a download that was killed")
    served = tmp_path / "served"
    served.mkdir()
    copy_into(shakespeare_file, served / "input.txt")
    with LocalServer(served) as server:
        download(f"{server.url}/input.txt", data_cache / "t.txt", data.SHAKESPEARE_SHA256, progress=False)
    assert sorted(p.name for p in data_cache.iterdir()) == ["t.txt"]


def test_a_trickling_server_hits_the_overall_deadline(tmp_path, data_cache):
    served = tmp_path / "served"
    served.mkdir()
    (served / "slow.txt").write_bytes(b"x" * 1000)
    with LocalServer(served, trickle=0.05) as server:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="exceeded its 1 s deadline") as err:
            download(f"{server.url}/slow.txt", data_cache / "slow.txt", "0" * 64, timeout=5, progress=False,
                     deadline=1.0)
        assert time.monotonic() - start < 5  # per-read timeouts alone would wait 50 s here
    assert "Nothing was saved" in str(err.value)
    assert not data_cache.exists() or list(data_cache.iterdir()) == []


def test_data_dir_that_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MOE_TUTORIAL_DATA", str(tmp_path / "file"))
    with pytest.raises(NotADirectoryError, match="MOE_TUTORIAL_DATA=.* is a file"):
        data.load_shakespeare(progress=False)


# --- checkpoints that are not ours ------------------------------------------------------------------------------

def test_random_bytes_checkpoint_never_suggests_unsafe_loading(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a readable checkpoint") as err:
        load_checkpoint(bad)
    assert "weights_only" not in str(err.value)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": RunsCode()}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="refused") as err:
        load_checkpoint(tmp_path / "ckpt.pt")
    assert not (tmp_path / "pwned").exists() and "weights_only" not in str(err.value)


def test_torch_file_that_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not a moe_tutorial training checkpoint"):
        load_checkpoint(tmp_path / "ckpt.pt")


# --- the command line: one line per user error, exit status 2, nothing lost -------------------------------------

@pytest.fixture
def cli(tmp_path, shakespeare_file, monkeypatch, capsys):
    """Run the CLI in this process on the char-tiny preset; returns (exit status, stdout, stderr)."""
    copy_into(shakespeare_file, tmp_path / "cache" / "tinyshakespeare.txt")
    monkeypatch.setenv("MOE_TUTORIAL_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("MOE_TUTORIAL_TRACEBACK", raising=False)

    def run(*args, out="out"):
        argv = ["--preset", "char-tiny", "--max-iters", "4", "--sample", "0", "--no-progress", "--threads", "1",
                "--out-dir", str(tmp_path / out), *args]
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def one_line_error(err):
    return len(err.strip().splitlines()) == 1 and "error: " in err


@pytest.mark.parametrize("args, words", [
    (["--threads", "0"], "--threads: must be >= 1, got 0"),
    (["--threads", "-2"], "--threads: must be >= 1, got -2"),
    (["--sample", "-1"], "--sample: must be >= 0, got -1"),
    (["--max-iters", "0"], "--max-iters: must be >= 1"),
    (["--batch-size", "x"], "'x' is not an integer"),
    (["--resume", "--overwrite"], "contradict"),
    (["--preset", "char", "--muon-experts", "--max-iters", "1"], "needs optimizer='muon'"),
])
def test_cli_refuses_bad_flags(cli, args, words):
    code, out, err = cli(*args)
    assert code == 2 and words in err and one_line_error(err)


@pytest.mark.parametrize("device, words", [
    ("cuda", "no CUDA GPU"), ("cuda:0", "no CUDA GPU"), ("gpu", "not a device PyTorch knows"),
])
def test_cli_refuses_a_device_this_machine_lacks(cli, device, words):
    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this machine has a GPU")
    code, out, err = cli("--device", device)
    assert code == 2 and words in err and one_line_error(err)


def test_cli_never_overwrites_a_trained_run(cli, tmp_path):
    assert cli()[0] == 0
    ckpt = tmp_path / "out" / "ckpt.pt"
    before = ckpt.read_bytes()
    code, out, err = cli()  # the same command again: a typo away from losing the run
    assert code == 2 and "--resume" in err and "--overwrite" in err and one_line_error(err)
    assert ckpt.read_bytes() == before
    assert cli("--overwrite", "--seed", "7")[0] == 0 and ckpt.read_bytes() != before


def test_cli_resume_that_would_train_nothing_is_refused(cli, tmp_path):
    assert cli()[0] == 0
    ckpt = tmp_path / "out" / "ckpt.pt"
    before = ckpt.read_bytes()
    code, out, err = cli("--resume")  # --max-iters 4 again: the checkpoint is at step 4
    assert code == 2 and "already trained 4 steps" in err and one_line_error(err)
    assert ckpt.read_bytes() == before and "val loss" not in out
    code, out, err = cli("--resume", "--max-iters", "6")
    assert code == 0 and "6 iters" in out


def test_cli_resume_without_a_checkpoint(cli):
    code, out, err = cli("--resume")
    assert code == 2 and "no checkpoint at" in err and one_line_error(err)


def test_cli_resume_from_a_file_that_is_not_a_checkpoint(cli, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.pt").write_bytes(os.urandom(1000))
    code, out, err = cli("--resume", "--max-iters", "8")
    assert code == 2 and "not a readable checkpoint" in err and "weights_only" not in err and one_line_error(err)


def test_cli_checks_the_out_dir_before_training(cli, tmp_path):
    (tmp_path / "a-file").write_text("")
    code, out, err = cli(out="a-file")
    assert code == 2 and "is a file, not a directory" in err and "val loss" not in out
    code, out, err = cli(out="/proc/moe-tutorial-out")  # a read-only file system, even for root
    assert code == 2 and "Cannot write to --out-dir" in err and "val loss" not in out and one_line_error(err)


def test_cli_read_only_data_dir_without_the_corpus(cli, monkeypatch):
    monkeypatch.setenv("MOE_TUTORIAL_DATA", "/proc/moe-tutorial-data")
    code, out, err = cli()
    assert code == 2 and "Cannot write to the data directory MOE_TUTORIAL_DATA=" in err and one_line_error(err)


@pytest.mark.parametrize("flag", ["--expert-parallel", "--fsdp"])
def test_cli_sharding_needs_torchrun(cli, flag):
    code, out, err = cli(flag)
    assert code == 2 and f"{flag} needs several ranks" in err and "torchrun" in err and one_line_error(err)


def test_cli_user_error_in_a_real_process_prints_no_traceback(tmp_path):
    env = {**os.environ, "MOE_TUTORIAL_DATA": str(tmp_path / "nothing-here" / "file")}
    (tmp_path / "nothing-here").mkdir()
    (tmp_path / "nothing-here" / "file").write_text("")
    result = subprocess.run([sys.executable, "-m", "moe_tutorial.train", "--no-progress"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "is a file, not a directory" in result.stderr


def test_a_checkpoint_killed_mid_write_leaves_the_previous_one_whole(tmp_path):
    """SIGKILL while a checkpoint is being written: the file on disk is still a complete checkpoint,
    and the next save removes the dead writer's temporary file."""
    import signal

    ckpt = tmp_path / "ckpt.pt"
    torch.save({"step": 1, "x": torch.zeros(3)}, ckpt)
    writer = ("import sys, torch\nfrom moe_tutorial.downloads import atomic_path\n"
              "state = {'step': 2, 'x': torch.ones(20_000_000)}\n"
              "while True:\n    with atomic_path(sys.argv[1]) as tmp:\n        torch.save(state, tmp)\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(ckpt)])
    deadline = time.monotonic() + 60
    try:
        while not any(p.stat().st_size > 0 for p in tmp_path.glob("ckpt.pt.*.tmp")):  # mid-write
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = torch.load(ckpt, weights_only=True)  # the old checkpoint, or a complete new one: never a torn one
    assert state["step"] in (1, 2) and state["x"].numel() in (3, 20_000_000)
    leftovers = list(tmp_path.glob("ckpt.pt.*.tmp"))
    assert leftovers, "the writer was killed after its last rename: nothing to clean up, test did not test"
    with atomic_path(ckpt) as tmp:
        torch.save({"step": 3}, tmp)
    assert list(tmp_path.glob("ckpt.pt.*.tmp")) == []


# --- damaged checkpoints, diverging runs, full disks: refused, and the last good checkpoint kept --------------------

def overwrite_a_tensor_with_nan(ckpt):
    """Overwrite 64 bytes inside the largest tensor of a torch.save archive with NaN bit patterns,
    as a bad disk or copy could: the file still unpickles, only the numbers change."""
    import struct
    import zipfile

    with zipfile.ZipFile(ckpt) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(ckpt.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the tensor's bytes (stored uncompressed)
    raw[start:start + 64] = b"\xff" * 64
    ckpt.write_bytes(bytes(raw))
    assert torch.load(ckpt, weights_only=True)["model"]  # still a loadable file: only a checksum can tell


def test_a_damaged_checkpoint_is_refused_and_never_resumed_over(cli, tmp_path):
    assert cli()[0] == 0
    ckpt = tmp_path / "out" / "ckpt.pt"
    overwrite_a_tensor_with_nan(ckpt)
    damaged = ckpt.read_bytes()
    code, out, err = cli("--resume", "--max-iters", "8")
    assert code == 2 and "is damaged" in err and "sha256" in err and one_line_error(err)
    assert ckpt.read_bytes() == damaged and "val loss" not in out


def test_checkpoints_record_a_sha256_of_their_contents(tiny_dataset, tmp_path):
    from moe_tutorial.checkpoint import state_sha256

    model = GPT(GPTConfig(vocab_size=tiny_dataset.tokenizer.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8))
    train(model, tiny_dataset, TrainConfig(max_iters=2, eval_interval=2, eval_iters=1, batch_size=2, progress=False),
          checkpoint_path=tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    recorded = state.pop("sha256")
    assert state_sha256(state) == recorded
    state["step"] += 1  # a plain value counts as much as a tensor
    assert state_sha256(state) != recorded


def test_a_run_that_diverges_stops_without_writing_a_checkpoint(cli, tmp_path):
    code, out, err = cli("--max-iters", "20")
    ckpt = tmp_path / "out" / "ckpt.pt"
    good = ckpt.read_bytes()
    import moe_tutorial.train as train_module

    real_step, calls = train_module.train_step, []

    def step_that_goes_nan(*args):  # steps 20 and 21 as usual, then a nan loss
        loss, aux, routing = real_step(*args)
        calls.append(loss)
        return (float("nan") if len(calls) > 2 else loss), aux, routing

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "train_step", step_that_goes_nan)
        code, out, err = cli("--resume", "--max-iters", "40")
    assert code == 2 and one_line_error(err) and "training diverged" in err and "at step 22" in err
    assert f"the last good checkpoint, {ckpt}, is untouched" in err
    assert ckpt.read_bytes() == good and not (tmp_path / "out" / ".lock").exists()


def test_a_real_divergence_is_caught_before_its_first_checkpoint(tiny_dataset, tmp_path):
    from moe_tutorial.train import TrainingDiverged

    model = GPT(GPTConfig(vocab_size=tiny_dataset.tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16))
    cfg = TrainConfig(max_iters=20, eval_interval=5, eval_iters=1, batch_size=4, learning_rate=1e30, min_lr=0.0,
                      warmup_iters=0, grad_clip=0.0, progress=False)  # weights of 1e30 overflow float32
    with pytest.raises(TrainingDiverged, match="is nan at step 1; stopped, and no checkpoint was written"):
        train(model, tiny_dataset, cfg, checkpoint_path=tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


def full_filesystem(path, size):
    """A tmpfs of `size` bytes mounted at `path` (root on Linux), or skip naming why it cannot be made."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip() or 'mount failed'}): needs root")
    return path


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    from moe_tutorial.downloads import DiskFullError

    disk = full_filesystem(tmp_path / "disk", 256 * 1024)
    try:
        ckpt = disk / "ckpt.pt"

        def save(n_embd):
            model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=1, n_embd=n_embd))
            save_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()), n_embd, TrainConfig(), History(),
                            torch.Generator())

        save(8)  # a few kB: fits
        with pytest.raises(DiskFullError) as err:
            save(256)  # ~800 kB of weights alone: does not
        message = str(err.value)
        assert message.startswith("no space left on device while writing")
        assert "the previous ckpt.pt is intact" in message
        assert "\n" not in message and load_checkpoint(ckpt)["step"] == 8
        assert sorted(p.name for p in disk.iterdir()) == ["ckpt.pt"]  # no temporary file left behind
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --- one run per out-dir ----------------------------------------------------------------------------------------

def test_an_out_dir_in_use_by_another_run_is_refused(cli, tmp_path):
    (tmp_path / "out").mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "out" / ".lock").write_text(writer_tag(other.pid) + "\n")  # as a running train would hold it
        code, out, err = cli()
        assert code == 2 and one_line_error(err) and f"in use by another run (process {other.pid} on" in err
        assert "choose another --out-dir" in err and not (tmp_path / "out" / "ckpt.pt").exists()
    finally:
        other.kill()
        other.wait()
    code, out, err = cli()  # its process is gone: a stale lock, cleared
    assert code == 0 and (tmp_path / "out" / "ckpt.pt").exists() and not (tmp_path / "out" / ".lock").exists()


def test_two_runs_started_together_into_one_out_dir(tmp_path, shakespeare_file):
    copy_into(shakespeare_file, tmp_path / "cache" / "tinyshakespeare.txt")
    env = {**os.environ, "MOE_TUTORIAL_DATA": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "moe_tutorial.train", "--preset", "char-tiny", "--max-iters", "200", "--sample",
               "0", "--no-progress", "--threads", "1", "--out-dir", str(tmp_path / "out")]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    assert sorted(code for code, _, _ in results) == [0, 2]  # one trains, the other is refused
    code, out, err = next(r for r in results if r[0] == 2)
    assert one_line_error(err) and ("in use by another run" in err or "already holds a trained run" in err)
    assert "checkpoint:" not in out


# --- data that does not fit the run ---------------------------------------------------------------------------------

def test_empty_text_is_refused_by_name():
    with pytest.raises(ValueError, match="^my notes is empty: there is nothing to train on"):
        data.Dataset.from_text("", source="my notes")


def test_a_text_too_short_for_a_block_names_the_split_and_the_length_needed():
    dataset = data.Dataset.from_text("To be, or not to be, that is the question", source="hamlet.txt")
    with pytest.raises(ValueError) as err:
        dataset.check_batches_fit(batch_size=1, block_size=32)
    assert str(err.value).startswith("hamlet.txt is too short: its validation split holds 5 tokens (12% of 41)")
    assert "one block needs 33; use a text of at least 271 tokens or a smaller block_size" in str(err.value)


def test_cli_refuses_a_batch_larger_than_the_data_before_training(cli, tmp_path):
    code, out, err = cli("--batch-size", "200000")
    assert code == 2 and one_line_error(err) and "batch_size=200,000 is more than the" in err
    assert "validation split of tiny Shakespeare" in err and "val loss" not in out
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_cli_corpus_path_that_is_a_directory(cli, tmp_path, monkeypatch):
    (tmp_path / "other-cache" / "tinyshakespeare.txt").mkdir(parents=True)
    monkeypatch.setenv("MOE_TUTORIAL_DATA", str(tmp_path / "other-cache"))
    code, out, err = cli()
    assert code == 2 and one_line_error(err) and "tinyshakespeare.txt is a directory" in err


def test_cli_expert_parallel_refuses_a_dense_model(cli, monkeypatch):
    from moe_tutorial import distributed

    monkeypatch.setattr(distributed, "setup", lambda: distributed.DistInfo(0, 2, 0))  # as under torchrun
    for variant in (["--variant", "dense"], []):
        code, out, err = cli("--expert-parallel", *variant)
        assert code == 2 and one_line_error(err) and "has none: choose an MoE --variant" in err


def test_a_download_that_stalls_below_the_minimum_rate_stops(tmp_path, data_cache):
    served = tmp_path / "served"
    served.mkdir()
    (served / "slow.txt").write_bytes(b"x" * 1000)
    with LocalServer(served, trickle=0.05) as server:  # 20 bytes/s: alive, but hopeless
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="stalled: .* bytes in the last 1 s, under 1,000 bytes/s") as err:
            download(f"{server.url}/slow.txt", data_cache / "slow.txt", "0" * 64, timeout=5, progress=False,
                     deadline=60, min_rate=1000, rate_window=1.0)
        assert time.monotonic() - start < 10  # the overall deadline (60 s) was not what stopped it
    assert "Nothing was saved" in str(err.value)
    assert not data_cache.exists() or list(data_cache.iterdir()) == []
