"""Models the notebooks share, cached in the data folder: notebook 01's trained character model,
which notebook 05 upcycles and later chapters analyse (loaded from the data cache when notebook 01
saved it, otherwise trained exactly as there, same seed, and saved); and notebook 08's offline
stand-in for a real MoE, a modern MoE trained on Shakespeare."""

import dataclasses
from pathlib import Path

import torch

from .config import MoEConfig
from .downloads import data_dir
from .model import GPT
from .presets import preset
from .pretrained import from_pretrained, save_pretrained
from .train import train


def char_model_dir() -> Path:
    return data_dir() / "checkpoints" / "char-gpt"


def pretrained_char_model(dataset, progress: bool = False) -> GPT:
    """Notebook 01's character-level GPT ("char" preset): loaded from the data cache where
    notebook 01 saved it, else trained here exactly as there (same seed) and saved. Training takes
    as long as in notebook 01, which prints its time (benchmarks/char_gpt.py times the recipe)."""
    model_config, train_config = preset("char", vocab_size=dataset.tokenizer.vocab_size, progress=progress)
    return _cached_or_trained(char_model_dir(), model_config, train_config, dataset, "the 'char' preset")


# Notebook 08's offline model: the char-modern recipe (notebook 07's block, Muon, but experts on
# AdamW, as it was first trained) with OLMoE-style MoE layers in every block: 32 fine-grained experts,
# 4 per token (4 x 84 = the dense SwiGLU width 336), softmax scores, weights not renormalised, the
# load-balancing loss.
COURSE_MOE = MoEConfig(n_experts=32, top_k=4, expert_hidden=84, normalize_weights=False)
COURSE_MOE_STEPS = 800


def modern_moe_dir() -> Path:
    return data_dir() / "checkpoints" / "char-modern-moe"


def pretrained_modern_moe(dataset, progress: bool = False) -> GPT:
    """Notebook 08's offline model (COURSE_MOE in the char-modern recipe, COURSE_MOE_STEPS steps):
    loaded from the data cache, else trained (seed 1337) and saved there: the first call trains for
    minutes on a CPU, later ones load."""
    model_config, train_config = preset("char-modern", vocab_size=dataset.tokenizer.vocab_size, progress=progress,
                                        max_iters=COURSE_MOE_STEPS, muon_experts=False)  # as notebook 08 was written
    model_config = dataclasses.replace(model_config, moe=dataclasses.replace(COURSE_MOE))
    return _cached_or_trained(modern_moe_dir(), model_config, train_config, dataset, "notebook 08's")


def _cached_or_trained(directory: Path, model_config, train_config, dataset, what: str) -> GPT:
    """The model saved in `directory` if its config is `model_config`; else trained (seeded by the
    recipe) and saved there. A saved model of another config is refused, naming what was expected."""
    if (directory / "model.safetensors").exists():
        model = from_pretrained(directory)
        if model.config != model_config:
            raise ValueError(f"{directory} holds a model with another config than {what}; "
                             f"delete that directory and it will be trained again")
        return model
    torch.manual_seed(train_config.seed)
    model = GPT(model_config)
    train(model, dataset, train_config)
    save_pretrained(model, directory)
    return model
