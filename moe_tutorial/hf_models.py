"""Llama-family checkpoints from Hugging Face as the package's GPT: Llama (dense), Mixtral,
Qwen3-MoE and OLMoE (notebooks 07-08).

They share one block, the modern one of notebook 07: RMSNorm, rotary positions, grouped-query
attention, SwiGLU, and softmax top-k routing in the MoE ones. What differs is a handful of
switches, each a GPTConfig / MoEConfig field here:

    model_type  QK-norm                   top-k weights      MoE blocks
    llama       -                         (dense)            none
    mixtral     -                         renormalised       all
    qwen3_moe   per head (over head_dim)  norm_topk_prob     every decoder_sparse_step-th
    olmoe       over the whole projection norm_topk_prob     all

`llama_family_config_from_hf` maps a `config.json` dict onto a GPTConfig, field by field: every
field is honoured, known to have no effect on the outputs, or refused with its name and value. The
models are dropless (every token reaches its experts), so the capacity factors are set to
n_experts / top_k, which makes an expert's capacity the whole batch. `weight_slots` and
`load_tensors` rename and fuse the weights: q, k and v into c_attn, gate and up into c_fc ([gate | up]), and experts
stored either fused (transformers' `experts.gate_up_proj` (E, 2I, C)) or one by one, as the Hub's
files store them (`experts.N.gate_proj` for Qwen3 and OLMoE, `experts.N.w1/w2/w3` for Mixtral).
"""

import json
import re
from pathlib import Path

import requests
import torch
from safetensors import safe_open

from .config import GPTConfig, MoEConfig
from .downloads import atomic_path, data_dir, ensure_writable_dir, fetch_hub_file, hub_url

ARCHITECTURES = ("llama", "mixtral", "qwen3_moe", "olmoe")

# Fields read by llama_family_config_from_hf for every architecture.
COMMON_FIELDS = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling", "hidden_act",
                 "intermediate_size", "attention_bias", "mlp_bias", "pretraining_tp", "tie_word_embeddings",
                 "max_position_embeddings", "router_aux_loss_coef", "model_type"}
# Fields that describe the checkpoint, tokenizer, training or generation, not the function computed.
NO_EFFECT = {"transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype", "torch_dtype",
             "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "initializer_range", "use_cache",
             "pad_token_id", "bos_token_id", "eos_token_id", "_name_or_path", "output_attentions",
             "output_router_logits", "id2label", "label2id", "tokenizer_class",
             "attention_dropout"}  # dropout: off at inference, and these checkpoints set 0
# Per architecture: the MoE fields read below (anything else is refused).
MOE_FIELDS = {
    "llama": set(),
    "mixtral": {"num_local_experts", "num_experts_per_tok", "router_jitter_noise", "sliding_window"},
    "qwen3_moe": {"num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "use_sliding_window",
                  "sliding_window", "max_window_layers"},
    "olmoe": {"num_experts", "num_experts_per_tok", "norm_topk_prob", "clip_qkv"},
}


def refuse_unknown_fields(hf: dict, known: set, allowed, what: str):
    """Refuse config.json fields no loader rule covers, unless the user vouches for them by name."""
    unknown = sorted(set(hf) - known - set(allowed))
    if unknown:
        raise ValueError(f"{what} config.json has field(s) this loader does not know: {unknown}. Remove them, or, "
                         f"if they do not change what the model computes (a note, metadata), load with "
                         f"from_pretrained(..., allow_unknown_fields={unknown})")


def check_floating(name: str, tensor: torch.Tensor, source):
    """Weights are floating point: a tensor stored as integers or booleans is damage or a wrong
    file, and casting it would load nonsense silently. (float16 / bfloat16 convert exactly.)"""
    if not tensor.is_floating_point():
        raise ValueError(f"{source}: {name} is stored as {tensor.dtype}, but weights are floating point; the file "
                         f"is damaged or not a checkpoint of this model, so it is refused rather than cast")


def llama_family_config_from_hf(hf: dict, block_size: int | None = None, allow_unknown_fields=()) -> GPTConfig:
    """The GPTConfig of a Hugging Face `config.json` dict. `block_size` caps the context (and
    the RoPE tables) below the checkpoint's max_position_embeddings, to save memory."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    refuse_unknown_fields(hf, COMMON_FIELDS | NO_EFFECT | MOE_FIELDS[model_type], allow_unknown_fields, model_type)
    _require(hf, "hidden_act", "silu", "the SwiGLU experts use SiLU")
    _require(hf, "pretraining_tp", 1, "tensor-parallel slicing of the MLP is a training detail; 1 computes exactly")
    if hf.get("mlp_bias", False) != hf.get("attention_bias", False):
        raise ValueError(f"mlp_bias={hf.get('mlp_bias')} differs from attention_bias={hf.get('attention_bias')}: "
                         f"this model has one `bias` switch for all its Linear layers")
    rope = _rope_theta(hf)
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_size = hf.get("head_dim")
    if head_size is not None and head_size == n_embd // n_head and n_embd % n_head == 0:
        head_size = None  # the default
    positions = hf.get("max_position_embeddings", 2048)
    return GPTConfig(
        block_size=min(positions, block_size) if block_size else positions,
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
        n_kv_head=hf.get("num_key_value_heads") or n_head, head_size=head_size,
        bias=bool(hf.get("attention_bias", False)), mlp_hidden=hf["intermediate_size"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), position="rope", rope_theta=rope,
        activation="swiglu", qk_norm={"qwen3_moe": "head", "olmoe": "projection"}.get(model_type, "none"),
        moe=_moe_config(hf, model_type),
    )


def _moe_config(hf, model_type) -> MoEConfig | None:
    if model_type == "llama":
        return None
    n_experts = hf.get("num_experts") or hf.get("num_local_experts")
    top_k = hf["num_experts_per_tok"]
    dropless = n_experts / top_k  # capacity = the whole batch: nothing is ever dropped
    fields = dict(n_experts=n_experts, top_k=top_k, capacity_factor_train=dropless, capacity_factor_eval=dropless,
                  aux_loss_coef=hf.get("router_aux_loss_coef", 0.01), z_loss_coef=0.0,
                  router_precision="model")  # transformers' routers multiply in the model's dtype
    if model_type == "mixtral":
        if hf.get("sliding_window") is not None:
            raise ValueError(f"sliding_window={hf['sliding_window']}: sliding-window attention is not implemented "
                             f"(Mixtral-8x7B's config sets null)")
        fields.update(expert_hidden=hf["intermediate_size"], normalize_weights=True,
                      jitter=hf.get("router_jitter_noise", 0.0))
    elif model_type == "qwen3_moe":
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true: sliding-window attention is not implemented")
        dense_layers = sorted(hf.get("mlp_only_layers") or [])
        if dense_layers != list(range(len(dense_layers))):
            raise ValueError(f"mlp_only_layers={dense_layers}: only a leading run of dense layers (0, 1, ...) is "
                             f"supported, as MoEConfig.first_k_dense")
        fields.update(expert_hidden=hf["moe_intermediate_size"], normalize_weights=bool(hf.get("norm_topk_prob")),
                      every=hf.get("decoder_sparse_step", 1), first_k_dense=len(dense_layers))
    else:  # olmoe: the experts use intermediate_size
        if hf.get("clip_qkv") is not None:
            raise ValueError(f"clip_qkv={hf['clip_qkv']}: clipping q, k, v is not implemented (OLMoE-1B-7B sets null)")
        fields.update(expert_hidden=hf["intermediate_size"], normalize_weights=bool(hf.get("norm_topk_prob")))
    if top_k == 1:
        fields["normalize_weights"] = False  # one expert: transformers leaves its softmax probability as is
    return MoEConfig(**fields)


def _rope_theta(hf) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={params['rope_type']!r}: only the default rotary embedding is implemented "
                         f"(no scaling for longer contexts)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _require(hf, name, value, why):
    if name in hf and hf[name] != value:
        raise ValueError(f"{name}={hf[name]!r} is not supported (only {value!r}: {why})")


HUB_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral's per-expert names
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)$")
EXPERT_KEY = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")


def weight_slots(config: GPTConfig, name: str):
    """Where a Hugging Face tensor goes in the package's model: a list of (parameter name,
    index into it, transpose?) -- usually one, none for tensors with nothing to fill (the
    recomputed RoPE frequencies, a tied lm_head). Raises for a name no such model has."""
    if name == "model.embed_tokens.weight":
        return [("transformer.wte.weight", ..., False)]
    if name == "model.norm.weight":
        return [("transformer.ln_f.weight", ..., False)]
    if name == "lm_head.weight":
        return [] if config.tie_embeddings else [("lm_head.weight", ..., False)]
    match = LAYER_KEY.match(name)
    if not match or int(match.group(1)) >= config.n_layer:
        raise ValueError(f"checkpoint tensor {name!r} has no place in a {config.n_layer}-layer model")
    layer, rest = int(match.group(1)), match.group(2)
    if rest.startswith("block_sparse_moe."):  # Mixtral's files name the MoE layer so
        rest = "mlp." + rest.removeprefix("block_sparse_moe.")
    dst = f"transformer.h.{layer}."
    q_width, kv_width = config.n_head * config.head_dim, config.kv_heads * config.head_dim
    attn_rows = {"q": slice(0, q_width), "k": slice(q_width, q_width + kv_width),
                 "v": slice(q_width + kv_width, q_width + 2 * kv_width)}
    simple = {"input_layernorm.weight": "ln_1.weight", "post_attention_layernorm.weight": "ln_2.weight",
              "self_attn.o_proj.weight": "attn.c_proj.weight", "self_attn.o_proj.bias": "attn.c_proj.bias",
              "self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight",
              "self_attn.rotary_emb.inv_freq": None}
    if rest in simple:
        return [] if simple[rest] is None else [(dst + simple[rest], ..., False)]
    if match := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
        return [(dst + f"attn.c_attn.{match.group(2)}", attn_rows[match.group(1)], False)]
    if not config.is_moe_layer(layer):  # a dense SwiGLU MLP: c_fc = [gate | up]
        hidden = config.mlp_width
        dense = {"gate_proj": slice(0, hidden), "up_proj": slice(hidden, 2 * hidden)}
        if match := re.fullmatch(r"mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)", rest):
            proj, kind = match.groups()
            if proj == "down_proj":
                return [(dst + f"mlp.c_proj.{kind}", ..., False)]
            return [(dst + f"mlp.c_fc.{kind}", dense[proj], False)]
        raise ValueError(f"checkpoint tensor {name!r} does not fit block {layer}, a dense block in this config")
    hidden = config.expert_width
    if rest == "mlp.gate.weight":
        return [(dst + "mlp.router.gate.weight", ..., False)]
    if rest == "mlp.experts.gate_up_proj":  # transformers' fused (E, 2I, C) -> ours (E, C, 2I)
        return [(dst + "mlp.experts.c_fc", ..., True)]
    if rest == "mlp.experts.down_proj":  # (E, C, I) -> (E, I, C)
        return [(dst + "mlp.experts.c_proj", ..., True)]
    if match := EXPERT_KEY.fullmatch(rest):  # the Hub's files: one matrix per expert, (out, in)
        expert, proj = int(match.group(1)), HUB_NAMES.get(match.group(2), match.group(2))
        if expert >= config.moe.n_experts:
            raise ValueError(f"checkpoint tensor {name!r}: expert {expert} of {config.moe.n_experts}")
        if proj == "down_proj":
            return [(dst + "mlp.experts.c_proj", (expert,), True)]
        columns = slice(0, hidden) if proj == "gate_proj" else slice(hidden, 2 * hidden)
        return [(dst + "mlp.experts.c_fc", (expert, slice(None), columns), True)]
    raise ValueError(f"checkpoint tensor {name!r} does not fit block {layer}, an MoE block in this config")


def load_tensors(model, tensors, source="checkpoint"):
    """Copy (name, tensor) pairs in Hugging Face naming into `model`, one tensor at a time (so a
    sharded checkpoint streams through memory), then check that every parameter was filled
    exactly once. Shapes are checked on the way, naming the tensor."""
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    filled = {}
    with torch.no_grad():
        for name, tensor in tensors:
            for target, index, transpose in weight_slots(model.config, name):
                value = tensor.transpose(-2, -1) if transpose else tensor
                slot = params[target][index]
                if slot.is_floating_point():
                    check_floating(name, value, source)
                if tuple(slot.shape) != tuple(value.shape):
                    raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, which does not fit "
                                     f"{target}{'' if index is ... else f'[{index}]'} of shape {tuple(slot.shape)}")
                slot.copy_(value)
                filled[target] = filled.get(target, 0) + value.numel()
    expected = {n: p.numel() for n, p in model.named_parameters()}
    missing = sorted(n for n, size in expected.items() if filled.get(n, 0) != size)
    if missing:
        raise ValueError(f"{source}: parameters not (or not fully) filled by the checkpoint: {missing[:4]}")
    for layer in model.moe_layers():  # softmax routers have no selection bias: start it at zero
        layer.router.selection_bias.zero_()
        layer.router.load_since_update.zero_()
    return model


def from_transformers(hf_model, block_size: int | None = None):
    """The package's GPT with a loaded transformers model's weights (same outputs, in fp32)."""
    from .model import GPT

    config = llama_family_config_from_hf(hf_model.config.to_dict(), block_size)
    dtype = next(hf_model.parameters()).dtype
    model = GPT(config).to(dtype)
    return load_tensors(model, hf_model.state_dict().items(), source=type(hf_model).__name__)


# --- checkpoint folders and the Hub -----------------------------------------------------------------------------------

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards its index names, or the single file."""
    directory = Path(directory)
    if (directory / INDEX).exists():
        weight_map = read_json(directory / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{directory / INDEX} has no weight_map: not a safetensors index")
        files = [directory / name for name in dict.fromkeys(weight_map.values())]  # in order, once each
    elif (directory / SINGLE).exists():
        files = [directory / SINGLE]
    else:
        raise FileNotFoundError(f"{directory} holds neither {SINGLE} nor {INDEX}")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{directory}: shard(s) {missing[:3]} named in {INDEX} are missing")
    return files


def empty_model(config: GPTConfig, dtype: torch.dtype):
    """The model allocated once, directly in `dtype`, with uninitialised weights (to be loaded):
    built on the meta device, so no fp32 copy is ever made."""
    from .model import GPT
    from .rope import RotaryEmbedding

    with torch.device("meta"):
        model = GPT(config).to(dtype)
    model = model.to_empty(device="cpu")
    # Buffers that are not loaded from the checkpoint are recomputed (to_empty leaves them garbage).
    if model.rope is not None:
        model.rope = RotaryEmbedding(config.head_dim, config.block_size, config.rope_theta).to(dtype)
    return model


def load_directory(directory, dtype: torch.dtype = torch.bfloat16, block_size: int | None = None,
                   allow_unknown_fields=()):
    """A Llama / Mixtral / Qwen3-MoE / OLMoE checkpoint folder (config.json + safetensors, single
    or sharded) as the package's GPT in `dtype`, copied tensor by tensor from memory-mapped shards:
    the model is allocated once, and no second copy of the weights is built."""
    directory = Path(directory)
    config = llama_family_config_from_hf(read_json(directory / "config.json"), block_size, allow_unknown_fields)
    files = checkpoint_files(directory)
    model = empty_model(config, dtype)

    def tensors():
        for path in files:
            with safe_open(path, framework="pt") as shard:
                for name in shard.keys():
                    yield name, shard.get_tensor(name)

    return load_tensors(model, tensors(), source=str(directory)).eval()


def read_json(path: Path) -> dict:
    """A checkpoint folder's JSON file (config.json, the shard index) as a dict, or one line saying
    what is wrong with it."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                         f"fix it or save the model again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(value).__name__}")
    return value


def hub_cache(repo: str) -> Path:
    return data_dir() / "hub" / repo.replace("/", "--")


def download_repo(repo: str, progress: bool = True, timeout: float = 30.0) -> Path:
    """A Hub repository's config.json and safetensors (single or sharded) in the data cache.

    Each weights file is streamed to a temporary file, checked against the sha256 the Hub
    announces for it, and only then renamed into place; the sha256 is recorded beside it and a
    cached file is checked again on every use (`downloads.fetch_hub_file`). config.json and the
    index are small git files (no sha256 announced): they are written atomically."""
    folder, config_url = hub_cache(repo), hub_url(repo, "config.json")
    try:
        _fetch_small(config_url, folder / "config.json", timeout)
    except FileNotFoundError:
        raise FileNotFoundError(f"{repo!r} is neither a local folder nor a Hub repository ({config_url} "
                                f"does not exist)") from None
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tokenizer and its chat template; optional
        try:
            _fetch_small(hub_url(repo, name), folder / name, timeout)
        except (FileNotFoundError, ConnectionError):
            pass
    if not (folder / INDEX).exists() and (folder / SINGLE).exists():
        names = [SINGLE]  # cached single-file checkpoint: nothing to ask the server
    else:
        try:
            _fetch_small(hub_url(repo, INDEX), folder / INDEX, timeout)
            names = list(dict.fromkeys(read_json(folder / INDEX)["weight_map"].values()))
        except FileNotFoundError:
            names = [SINGLE]
    for name in names:
        fetch_hub_file(hub_url(repo, name), folder / name, timeout, progress)
    return folder


def _fetch_small(url: str, dest: Path, timeout: float):
    """A small text file, unless already cached; FileNotFoundError if the server has none."""
    if dest.exists():
        return
    try:
        response = requests.get(url, timeout=timeout)
    except requests.RequestException as err:
        raise ConnectionError(f"could not reach {url} ({type(err).__name__}); offline, put the checkpoint "
                              f"folder at {dest.parent} or load a local folder instead") from None
    if response.status_code == 404:
        raise FileNotFoundError(url)
    response.raise_for_status()
    ensure_writable_dir(dest.parent, "model cache")  # only now: a wrong name leaves no empty folder
    with atomic_path(dest) as tmp:
        tmp.write_bytes(response.content)
