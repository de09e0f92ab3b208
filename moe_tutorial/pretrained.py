"""Pretrained weights: GPT-2 from the Hugging Face Hub, our own models in safetensors.

    model = from_pretrained("gpt2")          # downloads model.safetensors once, into the data cache
    save_pretrained(model, "out/my-model")    # config.json + model.safetensors
    model = from_pretrained("out/my-model")   # a directory: ours, or one written by transformers
    model = pretrained_char_model(dataset)    # notebook 01's character model (saved there)

GPT-2 was written in TensorFlow with "Conv1D" layers whose weights are stored (in, out); our
nn.Linear stores (out, in), so those four matrices per block are transposed. Everything else
maps name for name (model.py uses GPT-2's names). The Hub serves the file's sha256 in its
X-Linked-Etag header; the download is checked against it before it is moved into the cache.
"""

import json
import os
import re
from pathlib import Path

import requests
import torch
from safetensors.torch import load_file, load_model, save_model

from .data import atomic_path, data_dir, download
from .model import GPT, GPTConfig
from .presets import gpt2_config, preset
from .train import train

HUB_REPOS = {  # our name -> Hugging Face repository
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old checkpoints


def hub_url(name: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")  # HF's own mirror variable
    return f"{endpoint}/{HUB_REPOS[name]}/resolve/main/model.safetensors"


def cache_path(name: str) -> Path:
    return data_dir() / "gpt2" / f"{name}.safetensors"


def hub_sha256(url: str, timeout: float = 30.0) -> str:
    """The sha256 the Hub publishes for a large (LFS) file, without downloading it."""
    response = requests.head(url, allow_redirects=False, timeout=timeout)  # the Hub answers 302 + headers
    response.raise_for_status()
    etag = response.headers.get("X-Linked-Etag") or response.headers.get("ETag") or ""
    etag = etag.removeprefix("W/").strip('"')
    if not re.fullmatch(r"[0-9a-f]{64}", etag):
        raise ValueError(f"{url} did not announce a sha256 (X-Linked-Etag: {etag!r}); cannot verify a download")
    return etag


def download_checkpoint(name: str, progress: bool = True, timeout: float = 30.0) -> Path:
    """The cached model.safetensors of a GPT-2 size, downloaded and verified on first use."""
    path = cache_path(name)
    if path.exists():
        return path
    url = hub_url(name)
    try:
        sha256 = hub_sha256(url, timeout)
    except requests.RequestException as err:
        raise FileNotFoundError(
            f"Could not reach {url} ({err.__class__.__name__}). If you are offline, download that file "
            f"elsewhere and place it at {path} (or set MOE_TUTORIAL_DATA to a directory that holds "
            f"gpt2/{path.name})."
        ) from err
    return download(url, path, sha256, timeout=timeout, progress=progress)


def config_from_hf(hf: dict) -> GPTConfig:
    """Our GPTConfig from a transformers GPT2Config's config.json."""
    unsupported = {k: hf[k] for k in ("n_inner", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")
                   if hf.get(k)}
    if hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        unsupported["layer_norm_epsilon"] = hf["layer_norm_epsilon"]
    activations = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
    if hf.get("activation_function", "gelu_new") not in activations:
        unsupported["activation_function"] = hf["activation_function"]
    if unsupported:
        raise ValueError(f"This GPT-2 checkpoint uses options model.py does not implement: {unsupported}")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True,
                     gelu_approximate=activations[hf.get("activation_function", "gelu_new")])


def convert_hf_state_dict(hf_state: dict) -> dict:
    """GPT-2 checkpoint tensors -> our state dict names and layouts (lm_head is tied to wte)."""
    state = {}
    for name, tensor in hf_state.items():
        name = name.removeprefix("transformer.")
        if name.endswith(NOT_WEIGHTS) or name == "lm_head.weight":
            continue
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # Conv1D stores (in, out); nn.Linear wants (out, in)
        state["transformer." + name] = tensor.contiguous()
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def load_hf_weights(model: GPT, hf_state: dict, source="checkpoint"):
    state = convert_hf_state_dict(hf_state)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
             for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not fit this GPT config: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, wrong shapes {wrong[:4]}. Is it a GPT-2 checkpoint of this size?")
    model.load_state_dict(state)
    return model


def from_pretrained(name_or_dir, progress: bool = True, timeout: float = 30.0) -> GPT:
    """A GPT with pretrained weights: a GPT-2 size by name, or a directory with
    config.json + model.safetensors (written by save_pretrained or by transformers)."""
    path = Path(name_or_dir)
    if path.is_dir():
        return _from_directory(path)
    if name_or_dir not in HUB_REPOS:
        raise ValueError(f"Unknown model {name_or_dir!r}: use one of {sorted(HUB_REPOS)} or a directory holding "
                         f"config.json and model.safetensors")
    weights = download_checkpoint(name_or_dir, progress=progress, timeout=timeout)
    model = GPT(gpt2_config(name_or_dir))
    return load_hf_weights(model, _read_safetensors(weights), source=str(weights))


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); delete it and download it again") from err


def _from_directory(path: Path) -> GPT:
    config_file, weights = path / "config.json", path / "model.safetensors"
    for f in (config_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing: a model directory holds config.json and model.safetensors")
    config = json.loads(config_file.read_text())
    if "moe_tutorial" in config:  # written by save_pretrained
        model = GPT(GPTConfig(**config["moe_tutorial"]))
        missing, unexpected = load_model(model, weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights} does not match {config_file}: missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]}")
        return model
    if config.get("model_type") != "gpt2":
        raise ValueError(f"{config_file} is neither a moe_tutorial nor a GPT-2 config "
                         f"(model_type={config.get('model_type')!r})")
    return load_hf_weights(GPT(config_from_hf(config)), _read_safetensors(weights), source=str(weights))


def save_pretrained(model: GPT, directory) -> Path:
    """Write config.json and model.safetensors (tied weights stored once); both atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = json.dumps({"moe_tutorial": model.config.to_dict()}, indent=2)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    with atomic_path(directory / "config.json") as tmp:
        tmp.write_text(config)
    return directory


def char_model_dir() -> Path:
    return data_dir() / "checkpoints" / "char-gpt"


def pretrained_char_model(dataset, progress: bool = False) -> GPT:
    """Notebook 01's character-level GPT ("char" preset): loaded from the data cache where
    notebook 01 saved it, else trained here exactly as there (same seed; ~100 s on 2 cores) and saved."""
    model_config, train_config = preset("char", vocab_size=dataset.tokenizer.vocab_size, progress=progress)
    directory = char_model_dir()
    if (directory / "model.safetensors").exists():
        model = from_pretrained(directory)
        if model.config != model_config:
            raise ValueError(f"{directory} holds a model with another config than the 'char' preset; "
                             f"delete that directory and it will be trained again")
        return model
    torch.manual_seed(train_config.seed)
    model = GPT(model_config)
    train(model, dataset, train_config)
    save_pretrained(model, directory)
    return model


@torch.no_grad()
def max_logit_difference(a: GPT, b: GPT, idx: torch.Tensor) -> float:
    """Largest |logit difference| of two models on the same tokens (eval mode)."""
    a.eval(), b.eval()
    return (a(idx)[0] - b(idx)[0]).abs().max().item()
