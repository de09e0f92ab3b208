"""GPT-2: presets and cost accounting, the BPE tokenizer offline, loading Hub checkpoints."""

import hashlib
import shutil

import pytest
import torch
from local_server import LocalServer, closed_port_url

from moe_tutorial import pretrained, tokenizers
from moe_tutorial.config import GPTConfig, MoEConfig
from moe_tutorial.costs import model_info
from moe_tutorial.model import GPT
from moe_tutorial.presets import GPT2_MOE_SHAPES, GPT2_SHAPES, gpt2_config
from moe_tutorial.pretrained import from_pretrained, save_pretrained
from moe_tutorial.tokenizers import GPT2Tokenizer

# Published parameter counts of OpenAI's four GPT-2 checkpoints (tied embeddings counted once).
PUBLISHED = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


def built_on_meta(config):
    with torch.device("meta"):  # shapes without memory: even the 2.4B preset is instant
        return GPT(config)


@pytest.mark.parametrize("name", list(GPT2_SHAPES) + list(GPT2_MOE_SHAPES))
def test_model_info_counts_every_parameter(name):
    config = gpt2_config(name)
    info = model_info(config)
    assert info.total_params == sum(p.numel() for p in built_on_meta(config).parameters())
    if name in PUBLISHED:
        assert info.total_params == info.active_params == PUBLISHED[name]
    else:
        assert info.active_params < info.total_params


@pytest.mark.parametrize("extra", [dict(moe=MoEConfig(n_experts=4, top_k=2, every=2, n_shared_experts=1,
                                                     expert_hidden=24)),
                                   dict(moe=MoEConfig(n_experts=3, noisy_gating=True), bias=True), dict(bias=True),
                                   dict(tie_embeddings=False, mlp_hidden=40, bias=True)])
def test_model_info_matches_numel_for_variants(extra):
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16, **extra)
    assert model_info(config).total_params == sum(p.numel() for p in GPT(config).parameters())


def test_model_info_by_hand():
    # C=8, V=10, T=4, 2 layers, no biases; block 1 (index 1) is MoE with 4 experts, top-2.
    config = GPTConfig(vocab_size=10, block_size=4, n_layer=2, n_head=2, n_embd=8,
                       moe=MoEConfig(n_experts=4, top_k=2, every=2))
    C = 8
    embeddings, final_norm = 10 * C + 4 * C, C
    attn_and_norms = 3 * C * C + C * C + 2 * C
    dense_mlp = 2 * C * 4 * C  # 512
    router, expert = C * 4, 2 * C * 4 * C
    info = model_info(config)
    assert info.total_params == embeddings + final_norm + 2 * attn_and_norms + dense_mlp + router + 4 * expert
    assert info.active_params == embeddings + final_norm + 2 * attn_and_norms + dense_mlp + router + 2 * expert
    attention = 12 * 2 * C * 4
    assert info.train_flops_per_token == 6 * (info.active_params - 4 * C) + attention
    assert info.memory_bytes["float32"]["total"] == 16 * info.total_params
    assert info.memory_bytes["bfloat16"] == dict(weights=2 * info.total_params, grads=2 * info.total_params,
                                                 adam=4 * info.total_params, total=8 * info.total_params)


def test_gpt2_flops_by_hand():
    # nanoGPT's estimate for GPT-2 124M at T=1024: 6 * 123.65M non-position-embedding + 12 * L * C * T.
    assert model_info(gpt2_config("gpt2")).train_flops_per_token == 6 * 123_653_376 + 12 * 12 * 768 * 1024
    # An untied output layer adds a matrix to memory, not to compute: the output matmul is there either way.
    untied, tied = model_info(gpt2_config("gpt2", tie_embeddings=False)), model_info(gpt2_config("gpt2"))
    assert untied.train_flops_per_token == tied.train_flops_per_token
    assert untied.total_params - tied.total_params == 50257 * 768


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="gpt2-medium"):
        gpt2_config("gpt3")


# --- tokenizer -------------------------------------------------------------------------------

@pytest.fixture
def r50k_in_cache(data_cache):
    from conftest import copy_into, course_data_file

    return copy_into(course_data_file(tokenizers.R50K_FILENAME), data_cache / tokenizers.R50K_FILENAME)


def test_gpt2_tokenizer_offline(r50k_in_cache, monkeypatch):
    monkeypatch.setattr(tokenizers, "R50K_URL", closed_port_url("r50k_base.tiktoken"))  # no network at all
    tok = GPT2Tokenizer(progress=False)
    assert tok.vocab_size == 50257 and tok.eot_token == 50256
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|endoftext|>") != [50256]  # corpus text never becomes a special token
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([50257])


def test_gpt2_tokenizer_missing_offline_names_url_and_path(data_cache, monkeypatch):
    url = closed_port_url("r50k_base.tiktoken")
    monkeypatch.setattr(tokenizers, "R50K_URL", url)
    with pytest.raises(FileNotFoundError) as err:
        GPT2Tokenizer(progress=False)
    assert url in str(err.value) and tokenizers.R50K_FILENAME in str(err.value)


# --- loading checkpoints ---------------------------------------------------------------------

def tiny_hf_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=3, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-zero biases and norms, so a mapping mistake cannot hide
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def test_from_pretrained_matches_transformers(tmp_path):
    hf = tiny_hf_model()
    hf.save_pretrained(tmp_path / "tiny", safe_serialization=True)
    model = from_pretrained(tmp_path / "tiny").eval()
    assert model.config.gelu_approximate == "tanh" and model.config.bias
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        ours = model(idx)[0]
    torch.testing.assert_close(ours, hf_logits(hf, idx), atol=1e-5, rtol=0)
    # Greedy continuations agree too (our KV-cache decoding vs transformers' forward).
    out = model.generate(idx[:1, :5], 10, temperature=1e-6)
    expected = idx[:1, :5]
    for _ in range(10):
        expected = torch.cat([expected, hf_logits(hf, expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def serve_as_hub(tmp_path, hf, repo="test/tiny-gpt2"):
    """Lay a checkpoint out like the Hub: <repo>/resolve/main/model.safetensors."""
    hf.save_pretrained(tmp_path / "saved", safe_serialization=True)
    served = tmp_path / "hub" / repo / "resolve" / "main"
    served.mkdir(parents=True)
    shutil.copy(tmp_path / "saved" / "model.safetensors", served / "model.safetensors")
    return tmp_path / "hub", hashlib.sha256((served / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture
def tiny_hub_name(monkeypatch):
    """Register a tiny GPT-2 under a Hub name, as if it were one of the four sizes."""
    import transformers

    monkeypatch.setitem(pretrained.HUB_REPOS, "tiny-gpt2", "test/tiny-gpt2")
    config = pretrained.gpt2_config_from_hf(transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=48,
                                                                    n_layer=3, n_head=4).to_dict())
    monkeypatch.setattr(pretrained, "gpt2_config", lambda name: config)
    return "tiny-gpt2"


def test_from_pretrained_downloads_verifies_and_caches(tmp_path, data_cache, tiny_hub_name, monkeypatch):
    hf = tiny_hf_model()
    hub, sha = serve_as_hub(tmp_path, hf)
    with LocalServer(hub, headers={"X-Linked-Etag": f'"{sha}"'}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        model = from_pretrained(tiny_hub_name, progress=False).eval()
    idx = torch.randint(0, 97, (1, 16))
    torch.testing.assert_close(model(idx)[0].detach(), hf_logits(hf, idx), atol=1e-5, rtol=0)
    assert pretrained.cache_path(tiny_hub_name).exists()
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())  # server gone: the cache is enough
    from_pretrained(tiny_hub_name, progress=False)


def test_from_pretrained_rejects_a_corrupt_download(tmp_path, data_cache, tiny_hub_name, monkeypatch):
    hub, _ = serve_as_hub(tmp_path, tiny_hf_model())
    with LocalServer(hub, headers={"X-Linked-Etag": '"' + "0" * 64 + '"'}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(ValueError, match="Checksum mismatch"):
            from_pretrained(tiny_hub_name, progress=False)
    cache_dir = pretrained.cache_path(tiny_hub_name).parent
    assert not cache_dir.exists() or not any(cache_dir.iterdir())  # nothing half-written


def test_from_pretrained_offline_names_url_and_cache_path(data_cache, monkeypatch):
    endpoint = closed_port_url("").rstrip("/")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(FileNotFoundError) as err:
        from_pretrained("gpt2", progress=False)
    message = str(err.value)
    assert f"{endpoint}/openai-community/gpt2/resolve/main/model.safetensors" in message
    assert str(pretrained.cache_path("gpt2")) in message


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown model"):
        from_pretrained("gpt5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "empty")
    hf = tiny_hf_model()
    hf.save_pretrained(tmp_path / "tiny", safe_serialization=True)
    small = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=48, bias=True))
    state = pretrained.load_file(tmp_path / "tiny" / "model.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        pretrained.load_hf_weights(small, state)
    (tmp_path / "tiny" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        from_pretrained(tmp_path / "tiny")


def test_save_pretrained_round_trip_moe(tmp_path):
    config = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16,
                       moe=MoEConfig(n_experts=4, top_k=2))
    model = GPT(config).eval()
    save_pretrained(model, tmp_path / "moe")
    assert sorted(p.name for p in (tmp_path / "moe").iterdir()) == ["config.json", "model.safetensors",
                                                                 "model.safetensors.sha256"]
    loaded = from_pretrained(tmp_path / "moe").eval()
    assert loaded.config == config
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
    idx = torch.randint(0, 40, (2, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
