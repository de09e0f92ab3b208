"""Pretrained weights in and out: GPT-2 from the Hugging Face Hub, our own models in
safetensors (notebook 05; notebook 01 saves its model with it).

    model = from_pretrained("gpt2")          # downloads model.safetensors once, into the data cache
    save_pretrained(model, "out/my-model")    # config.json + model.safetensors
    model = from_pretrained("out/my-model")   # a directory: ours, or one written by transformers

GPT-2 was written in TensorFlow with "Conv1D" layers whose weights are stored (in, out); our
nn.Linear stores (out, in), so those four matrices per block are transposed. Everything else
maps name for name (model.py uses GPT-2's names). The Hub serves the file's sha256 in its
X-Linked-Etag header; the download is checked against it before it is moved into the cache.
"""

import json
from pathlib import Path

import requests
import torch
from safetensors.torch import load_file, save_model

from . import hf_models
from .config import CONFIG_VERSION, GPTConfig
from .downloads import (
    atomic_path,
    check_sha256,
    data_dir,
    fetch_hub_file,
    hub_url,
    record_sha256,
    sha256_of,
    sha256_record,
)
from .hf_models import check_floating, read_json, refuse_unknown_fields
from .model import GPT
from .presets import gpt2_config

HUB_REPOS = {  # our name -> Hugging Face repository
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old checkpoints


def cache_path(name: str) -> Path:
    return data_dir() / "gpt2" / f"{name}.safetensors"


def download_checkpoint(name: str, progress: bool = True, timeout: float = 30.0) -> Path:
    """The cached model.safetensors of a GPT-2 size, downloaded and verified on first use.

    The sha256 the Hub announced is recorded beside the file, and a cached file is checked
    against it every time it is used: a file that was swapped or damaged in the cache is refused.
    """
    path = cache_path(name)
    url = hub_url(HUB_REPOS[name], "model.safetensors")
    try:
        return fetch_hub_file(url, path, timeout, progress)
    except requests.RequestException as err:  # only asking the Hub for the sha256 raises these
        raise FileNotFoundError(
            f"Could not reach {url} ({err.__class__.__name__}). If you are offline, download that file "
            f"elsewhere and place it at {path} (or set MOE_TUTORIAL_DATA to a directory that holds "
            f"gpt2/{path.name}), with its sha256 in {sha256_record(path).name} beside it."
        ) from err


# Every field of transformers' GPT2Config, sorted by what loading does with it.
HF_HONOURED = {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
               "resid_pdrop", "embd_pdrop", "attn_pdrop", "tie_word_embeddings",
               # the same computation, only arranged differently (fp32 results agree to rounding):
               "reorder_and_upcast_attn", "chunk_size_feed_forward"}
HF_DEFAULT_ONLY = {  # options model.py does not implement: loaded only at these values
    "layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False, "is_encoder_decoder": False, "pruned_heads": {},
}
HF_IGNORED = {  # no effect on the language model's outputs: initialisation, other heads, runtime, metadata
    "initializer_range", "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "output_hidden_states", "output_attentions", "return_dict", "torchscript", "dtype",
    "torch_dtype", "use_bfloat16", "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class",
    "prefix", "task_specific_params", "architectures", "model_type", "transformers_version", "n_ctx", "is_decoder",
    "tie_encoder_decoder", "cross_attention_hidden_size", "tf_legacy_loss", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
}
HF_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
HF_LM_ARCHITECTURES = {"GPT2LMHeadModel", "GPT2Model", "GPT2DoubleHeadsModel"}  # same language model


def gpt2_config_from_hf(hf: dict, allow_unknown_fields=()) -> GPTConfig:
    """Our GPTConfig from a transformers GPT2Config's config.json: every option is either
    honoured exactly or refused with its name and value; a field no rule knows is refused unless
    named in `allow_unknown_fields`."""
    private = {k for k in hf if k.startswith("_")}
    refuse_unknown_fields(hf, HF_HONOURED | HF_DEFAULT_ONLY.keys() | HF_IGNORED | private, allow_unknown_fields,
                          "GPT-2")
    refused = {k: hf[k] for k, default in HF_DEFAULT_ONLY.items() if k in hf and hf[k] != default}
    activation = hf.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        refused["activation_function"] = activation
    pdrops = {k: hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(pdrops.values())) > 1:  # model.py has one dropout rate for all three places
        refused |= pdrops
    if hf.get("n_ctx") not in (None, hf.get("n_positions")):
        refused["n_ctx"] = hf["n_ctx"]
    other_heads = set(hf.get("architectures") or []) - HF_LM_ARCHITECTURES
    if other_heads:
        refused["architectures"] = sorted(other_heads)
    if refused:
        detail = ", ".join(f"{k}={v!r}" for k, v in refused.items())
        raise ValueError(f"This GPT-2 checkpoint uses options model.py does not implement: {detail}. "
                         f"Loading it would give different outputs, so it is refused.")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True, dropout=pdrops["resid_pdrop"],
                     gelu_approximate=HF_ACTIVATIONS[activation], mlp_hidden=hf.get("n_inner"),
                     tie_embeddings=hf.get("tie_word_embeddings", True))


def convert_hf_state_dict(hf_state: dict, tie_embeddings: bool = True) -> dict:
    """GPT-2 checkpoint tensors -> our state dict names and layouts. With tied embeddings the
    output layer is the token embedding; untied, the file's own lm_head.weight is used."""
    state = {}
    for name, tensor in hf_state.items():
        name = name.removeprefix("transformer.")
        if name.endswith(NOT_WEIGHTS) or name == "lm_head.weight":
            continue
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # Conv1D stores (in, out); nn.Linear wants (out, in)
        state["transformer." + name] = tensor.contiguous()
    if tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    elif "lm_head.weight" in hf_state:
        state["lm_head.weight"] = hf_state["lm_head.weight"]
    return state


def load_hf_weights(model: GPT, hf_state: dict, source="checkpoint"):
    state = convert_hf_state_dict(hf_state, model.config.tie_embeddings)
    check_state_fits(model, state, source)
    model.load_state_dict(state)
    return model


def check_state_fits(model: GPT, state: dict, source):
    """Refuse weights that do not fit the model, naming the tensors, the shapes and the file."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and name in state:
            check_floating(name, state[name], source)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [f"{k} has shape {tuple(state[k].shape)} in the file but {tuple(expected[k])} in the config"
             for k in sorted(expected.keys() & state.keys()) if tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        problems = "; ".join(wrong[:3] + ([f"missing {missing[:4]}"] if missing else [])
                             + ([f"unexpected {unexpected[:4]}"] if unexpected else []))
        raise ValueError(f"{source} does not fit its model config: {problems}. Were the weights and the "
                         f"config written together (same model size)?")


def from_pretrained(name_or_dir, progress: bool = True, timeout: float = 30.0, dtype=None,
                    block_size: int | None = None, allow_unknown_fields=()) -> GPT:
    """A GPT with pretrained weights: a GPT-2 size by name; a Hub repository ("org/name") of a
    Llama, Mixtral, Qwen3-MoE or OLMoE model (notebook 08; bfloat16 unless `dtype` says otherwise;
    `block_size` caps their long contexts, whose KV cache would otherwise be allocated in full);
    or a directory with config.json and safetensors (written by save_pretrained or transformers).
    `allow_unknown_fields` names config.json fields you vouch have no effect on the outputs."""
    path = Path(name_or_dir)
    if path.is_dir():
        config = read_json(path / "config.json") if (path / "config.json").exists() else {}
        if config.get("model_type") in hf_models.ARCHITECTURES:
            return hf_models.load_directory(path, dtype or torch.bfloat16, block_size, allow_unknown_fields)
        return _from_directory(path, allow_unknown_fields)
    if "/" in str(name_or_dir) and not path.exists():
        folder = hf_models.download_repo(str(name_or_dir), progress=progress, timeout=timeout)
        return hf_models.load_directory(folder, dtype or torch.bfloat16, block_size, allow_unknown_fields)
    if name_or_dir not in HUB_REPOS:
        raise ValueError(f"Unknown model {name_or_dir!r}: use one of {sorted(HUB_REPOS)}, a Hub repository such as "
                         f"'allenai/OLMoE-1B-7B-0924', or a directory holding config.json and model.safetensors")
    weights = download_checkpoint(name_or_dir, progress=progress, timeout=timeout)  # verified
    model = GPT(gpt2_config(name_or_dir))
    return load_hf_weights(model, _read_safetensors(weights), source=str(weights))


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: truncated or not "
                         f"safetensors); delete it and download or save it again") from None


def _from_directory(path: Path, allow_unknown_fields=()) -> GPT:
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.exists() and (path / "ckpt.pt").exists():
        raise FileNotFoundError(
            f"{path} holds a training checkpoint (ckpt.pt), not a saved model: load it with "
            f"model_from_checkpoint(load_checkpoint('{path / 'ckpt.pt'}')) from moe_tutorial.checkpoint, and "
            f"save_pretrained that model to a folder from_pretrained reads")
    for f in (config_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing: a model directory holds config.json and model.safetensors")
    config = read_json(config_file)
    record = sha256_record(weights)
    if record.exists():  # written by save_pretrained: the weights must be the bytes it wrote
        check_sha256(weights, record.read_text().strip(),
                     problem=f"does not match the sha256 recorded in {record.name} when it was saved",
                     fix=f"It was damaged or changed after saving: save the model again (or delete {record.name} "
                         f"if you changed the weights on purpose).")
    state = _read_safetensors(weights)
    if "moe_tutorial" in config:  # written by save_pretrained
        model = GPT(GPTConfig.from_dict(config["moe_tutorial"], config_file))
        if model.config.tie_embeddings:  # the shared matrix is stored once, under either name
            head, embedding = "lm_head.weight", "transformer.wte.weight"
            for name, twin in ((head, embedding), (embedding, head)):
                if name not in state and twin in state:
                    state[name] = state[twin]
        check_state_fits(model, state, weights)
        model.load_state_dict(state)
        return model
    if config.get("model_type") != "gpt2":
        raise ValueError(f"{config_file} is neither a moe_tutorial nor a GPT-2 config "
                         f"(model_type={config.get('model_type')!r})")
    return load_hf_weights(GPT(gpt2_config_from_hf(config, allow_unknown_fields)), state, source=str(weights))


def save_pretrained(model: GPT, directory) -> Path:
    """Write config.json and model.safetensors (tied weights stored once), each atomically, and
    the weights' sha256 beside them (model.safetensors.sha256, as `sha256sum` prints it without
    the name), which from_pretrained checks: damaged weights are refused, not loaded."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "model.safetensors"
    config = json.dumps({"moe_tutorial": model.config.to_dict(), "config_version": CONFIG_VERSION}, indent=2)
    sha256_record(weights).unlink(missing_ok=True)  # never a record that disagrees with the weights beside it
    with atomic_path(weights) as tmp:
        save_model(model, str(tmp))
        sha256 = sha256_of(tmp)
    with atomic_path(directory / "config.json") as tmp:
        tmp.write_text(config)
    record_sha256(weights, sha256)
    return directory
