"""Training checkpoints: save, load (weights only), check that a resume fits (notebook 01).

A checkpoint holds the model and optimizer states, the step, both configs, the history and
every random state, so a resumed run continues exactly as an uninterrupted one would. It is
written atomically and read with `torch.load(..., weights_only=True)`: tensors and plain values
only, no code can run. It carries a sha256 of its own contents, checked at load, so a file whose
bytes were damaged on disk is refused instead of resumed. Anything that is not such a checkpoint
is refused with the reason.
"""

import hashlib
import pickle
import warnings
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import torch

from .config import CONFIG_VERSION, GPTConfig, config_diff
from .downloads import atomic_path
from .history import History
from .model import GPT

CHECKPOINT_KEYS = ("model", "optimizer", "step", "model_config", "train_config", "history", "rng")


def state_sha256(state) -> str:
    """A sha256 of a checkpoint's contents: every tensor's dtype, shape and bytes, and every plain
    value, walked in a fixed order. It is the same after a save and a load, whatever the device."""
    digest = hashlib.sha256()

    def feed(value):
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)};".encode())
            for key in sorted(value, key=repr):  # optimizer states have int keys
                feed(key)
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)};".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    feed(state)
    return digest.hexdigest()


def save_checkpoint(path, model, optimizer, step, cfg, history, batch_rng, extra=None):
    """Write atomically: a crash mid-save never leaves a truncated checkpoint behind."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config_version": CONFIG_VERSION,
        "model_config": model.config.to_dict(),
        "train_config": asdict(cfg),
        "history": history.to_dict(),
        "rng": {"torch": torch.get_rng_state(), "batches": batch_rng.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []},
        "extra": extra or {},
    }
    write_checkpoint_file(path, state)


def write_checkpoint_file(path, state: dict):
    """Write `state` (save_checkpoint's layout) with its sha256, atomically."""
    state["sha256"] = state_sha256(state)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: a full disk raises OSError
        torch.save(state, f)


def load_checkpoint(path) -> dict:
    """A checkpoint written by save_checkpoint, loaded weights-only. Anything else is refused."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}; train first or check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own message would suggest weights_only=False: never do that here
        if isinstance(err, pickle.UnpicklingError) and zipfile.is_zipfile(path):  # a torch.save archive
            raise ValueError(f"{path} holds Python objects other than tensors and plain values, so it was not "
                             f"written by moe_tutorial and is refused (loading it could run code)") from None
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: truncated, corrupt or not "
                         f"a PyTorch file); delete it and retrain") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is a PyTorch file but not a moe_tutorial training checkpoint "
                         f"(no {', '.join(missing)}); use a ckpt.pt written by moe_tutorial.train")
    recorded = state.pop("sha256", None)  # None: written before checkpoints carried one
    if recorded is not None and state_sha256(state) != recorded:
        raise ValueError(f"{path} is damaged: its contents no longer match the sha256 recorded when it was saved "
                         f"(bytes changed on disk or in a copy), so it is refused; use an intact copy or retrain")
    return state


def config_from_checkpoint(state: dict, source="checkpoint") -> GPTConfig:
    """The model config a checkpoint was saved with (older layouts converted)."""
    return GPTConfig.from_dict(state["model_config"], source)


def model_from_checkpoint(state: dict) -> GPT:
    model = GPT(config_from_checkpoint(state))
    model.load_state_dict(state["model"])
    return model


def check_compatible(model, state, path="checkpoint"):
    """Refuse to resume a model from a checkpoint made for another configuration. Options
    added since the checkpoint was written count at their defaults; kernels are not compared."""
    diff = config_diff(config_from_checkpoint(state, path).to_dict(), model.config.to_dict())
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{path} was saved for a different model config ({detail}). Build the model with "
            f"config_from_checkpoint(state) or start a fresh run in another out_dir."
        )


# Training options a resume may change: how long to train, where, and how often to evaluate.
RESUMABLE_CHANGES = ("max_iters", "lr_decay_iters", "device", "progress", "eval_interval", "eval_iters", "compile")


def check_same_tokenizer(saved: dict, now: dict, path):
    """A resumed run must turn text into the same token ids as the saved one: the `extra` of both
    (as the CLI writes it) must name the same tokenizer and, for characters, the same vocabulary."""
    for key in ("tokenizer", "chars"):
        if key in saved and key in now and saved[key] != now[key]:
            what = "vocabulary of characters" if key == "chars" else f"tokenizer ({saved[key]!r} vs now {now[key]!r})"
            raise ValueError(f"{path} was trained with another {what}: token ids would change meaning; resume "
                             f"with the data and --tokenizer it was trained on, or start a fresh run in another "
                             f"--out-dir")


def restore(state: dict, model, optimizer, batch_rng, path, cfg) -> tuple[int, History]:
    """Load a checkpoint's model, optimizer and random states to resume it with TrainConfig `cfg`;
    returns its step and its history. A different recipe (learning rate, batch, seed, ...) is
    refused: the run would not be the one that was saved. Training longer is allowed, and warned
    about when it reshapes the learning-rate schedule."""
    check_compatible(model, state, path)
    step, saved = state["step"], state["train_config"]
    if step >= cfg.max_iters:
        raise ValueError(f"{path} has already trained {step} steps, so max_iters={cfg.max_iters} leaves "
                         f"nothing to train; ask for more (e.g. --max-iters {2 * step})")
    defaults = {f.name: f.default for f in fields(cfg)}  # options added since the checkpoint: at their defaults
    recipe = {k: saved.get(k, defaults[k]) for k in defaults}
    diff = {k: (v, recipe[k]) for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES and recipe[k] != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {b!r} vs now {a!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{path} was trained with another recipe ({detail}); resume with the checkpoint's values "
                         f"or start a fresh run in another out_dir")
    saved_decay = saved.get("lr_decay_iters") or saved["max_iters"]
    if saved_decay != cfg.decay_iters:
        warnings.warn(f"resuming {path} at step {step} with the cosine schedule stretched from {saved_decay} to "
                      f"{cfg.decay_iters} steps: the learning rate changes from here on", stacklevel=2)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"].get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    batch_rng.set_state(state["rng"]["batches"])
    return step, History(**state["history"])
