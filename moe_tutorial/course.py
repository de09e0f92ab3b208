"""Models the notebooks share: notebook 01's trained character model, which notebook 05
upcycles and later chapters analyse. Loaded from the data cache when notebook 01 saved it,
otherwise trained exactly as there (same seed, ~100 s on 2 cores) and saved."""

from pathlib import Path

import torch

from .downloads import data_dir
from .model import GPT
from .presets import preset
from .pretrained import from_pretrained, save_pretrained
from .train import train


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
