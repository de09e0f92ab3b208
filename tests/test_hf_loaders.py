"""Loading real MoE checkpoints (notebook 08): Mixtral, Qwen3-MoE, OLMoE (and dense Llama) folders as
transformers writes them, single-file and sharded, fp32 and bf16, from a folder or a (local) Hub."""

import hashlib
import json
import shutil

import pytest
import torch
from local_server import LocalServer, closed_port_url

from moe_tutorial import hf_models
from moe_tutorial.pretrained import from_pretrained

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                                  **COMMON),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                                     num_experts_per_tok=2, head_dim=16, **COMMON),
    "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=16, num_experts=4, num_experts_per_tok=2, **COMMON),
    "llama": lambda: transformers.LlamaConfig(intermediate_size=48, **COMMON),
}


def saved(tmp_path, arch, shard=False):
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))  # norms away from 1
    folder = tmp_path / f"{arch}-{'sharded' if shard else 'single'}"
    model.save_pretrained(folder, max_shard_size="20KB" if shard else "5GB")
    return model, folder


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_checkpoint_folder_loads_exactly(tmp_path, arch, shard):
    theirs, folder = saved(tmp_path, arch, shard)
    assert (folder / "model.safetensors.index.json").exists() == shard
    ours = from_pretrained(folder, dtype=torch.float32)
    idx = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, theirs(idx).logits, atol=1e-5, rtol=0)
    expected = theirs.generate(idx[:1, :4], max_new_tokens=10, do_sample=False)
    assert torch.equal(ours.generate(idx[:1, :4], 10, top_k=1), expected)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe"])
def test_bf16_is_loaded_in_bf16_and_close(tmp_path, arch):
    theirs, folder = saved(tmp_path, arch, shard=True)
    ours = from_pretrained(folder)  # bfloat16 by default
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    reference = from_pretrained(folder, dtype=torch.float32)
    for name, param in ours.named_parameters():  # every weight is the fp32 one, rounded once
        assert torch.equal(param, reference.get_parameter(name).to(torch.bfloat16)), name
    idx = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(idx).logits.float() - theirs.to(torch.bfloat16)(idx).logits.float()).abs().max()
    assert diff < 0.05  # bf16 rounding (~0.005 measured); a wrong weight or layout gives differences of order 1


def test_wrong_or_missing_tensors_are_refused(tmp_path):
    _, folder = saved(tmp_path, "qwen3_moe", shard=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["model.layers.1.self_attn.q_norm.weight"]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        from_pretrained(folder)
    _, single = saved(tmp_path, "olmoe")
    config = json.loads((single / "config.json").read_text())
    (single / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="has no place in a 1-layer model"):
        from_pretrained(single)
    (single / "config.json").write_text(json.dumps({**config, "intermediate_size": 24}))
    with pytest.raises(ValueError, match="does not fit"):
        from_pretrained(single)


def test_loading_keeps_one_copy_of_the_weights(tmp_path):
    _, folder = saved(tmp_path, "mixtral")
    config = hf_models.llama_family_config_from_hf(json.loads((folder / "config.json").read_text()))
    model = hf_models.empty_model(config, torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rope.cos.dtype == torch.bfloat16 and torch.isfinite(model.rope.cos).all()


def hub_folder(tmp_path, arch):
    """A local stand-in for huggingface.co: <root>/<org>/<name>/resolve/main/<files>."""
    _, folder = saved(tmp_path, arch, shard=True)
    root = tmp_path / "hub"
    shutil.copytree(folder, root / "test-org" / arch / "resolve" / "main")
    sha = {f"/test-org/{arch}/resolve/main/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()
           for f in folder.glob("*.safetensors")}
    return root, sha


def test_hub_download_is_verified_cached_and_works_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_TUTORIAL_DATA", str(tmp_path / "cache"))
    root, sha = hub_folder(tmp_path, "olmoe")
    with LocalServer(root, headers=lambda path: {"X-Linked-Etag": f'"{sha.get(path, "")}"'}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        model = from_pretrained("test-org/olmoe", progress=False)
    cached = tmp_path / "cache" / "hub" / "test-org--olmoe"
    assert len(list(cached.glob("*.safetensors"))) == len(sha) > 1
    assert all((cached / (f.name + ".sha256")).exists() for f in cached.glob("*.safetensors"))
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())  # offline: the verified cache is enough
    again = from_pretrained("test-org/olmoe", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_hub_download_with_a_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_TUTORIAL_DATA", str(tmp_path / "cache"))
    root, _ = hub_folder(tmp_path, "mixtral")
    with LocalServer(root, headers={"X-Linked-Etag": '"' + "0" * 64 + '"'}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(ValueError, match="sha256"):
            from_pretrained("test-org/mixtral", progress=False)
    cached = tmp_path / "cache" / "hub" / "test-org--mixtral"
    assert not list(cached.glob("model-*"))  # no shard, no temporary file (config and index stay: small, complete)


def test_unknown_repository_names_the_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_TUTORIAL_DATA", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    with LocalServer(tmp_path / "empty") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub repository"):
            from_pretrained("no-such/model", progress=False)
    assert not (tmp_path / "cache" / "hub" / "no-such--model").exists()
