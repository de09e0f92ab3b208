"""Tiny Shakespeare, split into train and validation token streams, and random batches (notebook 01).

The corpus comes from the verified data cache (`moe_tutorial.downloads`); text becomes tokens
with a tokenizer from `moe_tutorial.tokenizers` (characters by default).
"""

import math
from dataclasses import dataclass

import torch

from .downloads import fetch
from .tokenizers import CharTokenizer

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_FILENAME = "tinyshakespeare.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_BYTES = 1_115_394


def load_shakespeare(progress: bool = True) -> str:
    """The tiny Shakespeare corpus (1,115,394 characters of plays), as one string."""
    path = fetch(SHAKESPEARE_URL, SHAKESPEARE_FILENAME, SHAKESPEARE_SHA256, progress=progress)
    return path.read_text(encoding="utf-8")


@dataclass
class Dataset:
    """A corpus encoded once, split 90/10 into train and validation token streams."""

    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64
    tokenizer: CharTokenizer
    source: str = "the text"  # what the tokens came from, for error messages

    @classmethod
    def from_text(cls, text: str, tokenizer=None, val_fraction: float = 0.1, source: str = "the text") -> "Dataset":
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if not text:
            raise ValueError(f"{source} is empty: there is nothing to train on")
        tokenizer = tokenizer or CharTokenizer.from_text(text)
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        n_train = int(len(ids) * (1 - val_fraction))
        return cls(ids[:n_train], ids[n_train:], tokenizer, source)

    def check_batches_fit(self, batch_size: int, block_size: int):
        """Refuse, before any training, a block or a batch that a split is too small for: every
        split must hold a block plus its next token, and at least `batch_size` distinct blocks."""
        total = len(self.train) + len(self.val)
        for name, tokens in (("training", self.train), ("validation", self.val)):
            blocks = len(tokens) - block_size  # distinct windows of block_size + 1 tokens
            if blocks < 1:
                share = len(tokens) / total
                raise ValueError(f"{self.source} is too short: its {name} split holds {len(tokens)} tokens "
                                 f"({share:.0%} of {total}), and one block needs {block_size + 1}; use a text of "
                                 f"at least {math.ceil((block_size + 1) / share)} tokens or a smaller block_size")
            if batch_size > blocks:
                raise ValueError(f"batch_size={batch_size:,} is more than the {blocks:,} distinct blocks of "
                                 f"{block_size} tokens that the {name} split of {self.source} holds; use at most "
                                 f"{blocks:,}")

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val


def shakespeare_dataset(progress: bool = True) -> Dataset:
    return Dataset.from_text(load_shakespeare(progress=progress), source="tiny Shakespeare")


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator=None):
    """Random contiguous windows: x is tokens [i, i+T), y the same shifted by one."""
    if len(data) <= block_size:
        raise ValueError(f"Need more than block_size={block_size} tokens, got {len(data)}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size)
    x = data[starts[:, None] + offsets]  # (B, T)
    y = data[starts[:, None] + offsets + 1]  # (B, T)
    return x, y
