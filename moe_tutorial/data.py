"""Tiny Shakespeare or your own text, split into train and validation token streams, and random
batches (notebook 01).

The corpus comes from the verified data cache (`moe_tutorial.downloads`); text becomes tokens
with a tokenizer from `moe_tutorial.tokenizers` (characters by default). Your own text (the CLI's
--data) is tokenized once into a memory-mapped token file in the data cache, named by its sha256.
"""

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .downloads import atomic_path, data_dir, ensure_writable_dir, fetch
from .tokenizers import CharTokenizer, GPT2Tokenizer

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_FILENAME = "tinyshakespeare.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_BYTES = 1_115_394


def shakespeare_path(progress: bool = True) -> Path:
    """The tiny Shakespeare file in the data cache (downloaded and verified if it is not there)."""
    return fetch(SHAKESPEARE_URL, SHAKESPEARE_FILENAME, SHAKESPEARE_SHA256, progress=progress)


def load_shakespeare(progress: bool = True) -> str:
    """The tiny Shakespeare corpus (1,115,394 characters of plays), as one string."""
    return shakespeare_path(progress).read_text(encoding="utf-8")


@dataclass
class Dataset:
    """A corpus encoded once, split 90/10 into train and validation token streams."""

    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64
    tokenizer: CharTokenizer
    source: str = "the text"  # what the tokens came from, for error messages

    @classmethod
    def from_text(cls, text: str, tokenizer=None, val_fraction: float = 0.1, source: str = "the text") -> "Dataset":
        check_not_empty(text, source)
        tokenizer = tokenizer or CharTokenizer.from_text(text)
        return cls.from_tokens(torch.tensor(tokenizer.encode(text), dtype=torch.long), tokenizer, val_fraction, source)

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, tokenizer, val_fraction: float = 0.1, source: str = "the text"):
        """The first 1 - val_fraction of the tokens to train on, the rest to validate on."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_train = int(len(tokens) * (1 - val_fraction))
        return cls(tokens[:n_train], tokens[n_train:], tokenizer, source)

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
    x = data[starts[:, None] + offsets].long()  # (B, T); a memory-mapped token file holds uint16
    y = data[starts[:, None] + offsets + 1].long()  # (B, T)
    return x, y


TOKENIZERS = ("char", "gpt2")


def read_text(path) -> tuple[str, str]:
    """Your corpus as one string, and a name for it: a UTF-8 file, or a folder's .txt files in name
    order with a blank line between files. Anything else is refused, saying what to do."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*.txt") if f.is_file())
        if not files:
            raise ValueError(f"--data {path} is a folder with no .txt files in it: point --data at a text file, "
                             f"or at a folder of .txt files")
        return "\n\n".join(_read_utf8(f) for f in files), f"{path} ({len(files)} .txt files)"
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: there is no such file or folder")
    return _read_utf8(path), str(path)


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}): convert "
                         f"it first, e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt") from None


def text_dataset(path, tokenizer: str = "char", progress: bool = True) -> Dataset:
    """Your own text (`read_text`), tokenized by "char" (a vocabulary of the characters it uses) or
    "gpt2" (GPT-2's BPE), split 90/10. The tokens are computed once and cached in the data folder
    as a memory-mapped file named by the text's sha256: a second run reads them back at once."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"--tokenizer {tokenizer!r}: choose one of {TOKENIZERS}")
    text, source = read_text(path)
    check_not_empty(text, source)
    tok = CharTokenizer.from_text(text) if tokenizer == "char" else GPT2Tokenizer(progress=progress)
    return Dataset.from_tokens(cached_tokens(text, tok, tokenizer, progress), tok, source=source)


def check_not_empty(text: str, source: str):
    if not text:
        raise ValueError(f"{source} is empty: there is nothing to train on")


def cached_tokens(text: str, tok, name: str, progress: bool = True) -> torch.Tensor:
    """`text` encoded by `tok`, as a read-only tensor over a memory-mapped token file in
    data/tokens/, written (atomically) only if no file for this text and tokenizer is there."""
    sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32  # half the bytes, as nanoGPT stores GPT-2's
    folder = ensure_writable_dir(data_dir() / "tokens", "the data cache's tokens folder")
    path, record = folder / f"{sha256[:32]}-{name}.bin", folder / f"{sha256[:32]}-{name}.json"
    expected = {"text_sha256": sha256, "tokenizer": name, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name}
    if not (path.exists() and record.exists() and _record_matches(record, expected, path)):
        ids = np.concatenate([np.asarray(tok.encode(piece), dtype=dtype)
                              for piece in tqdm(_pieces(text), desc=f"tokenizing ({name})", disable=not progress)])
        with atomic_path(path) as tmp:
            ids.tofile(tmp)
        with atomic_path(record) as tmp:
            tmp.write_text(json.dumps({**expected, "tokens": len(ids)}))
    return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c"))  # copy-on-write: never writes the file


def _record_matches(record: Path, expected: dict, path: Path) -> bool:
    """The cached token file is this text's, for this tokenizer, and whole."""
    try:
        saved = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    itemsize = np.dtype(expected["dtype"]).itemsize
    return ({k: saved.get(k) for k in expected} == expected
            and path.stat().st_size == saved.get("tokens", -1) * itemsize)


def _pieces(text: str, size: int = 1 << 20):
    """`text` in pieces of about `size` characters, each cut after a lone newline (a non-space
    character before and after it). GPT-2's pre-tokenizer splits there and BPE never merges across
    its splits, so encoding the pieces gives exactly the tokens of the whole. (After a run of
    spaces or newlines it would not: at the end of a piece "\n\n" is one token, before a letter two.)"""
    start = 0
    while start < len(text):
        end = start + size
        while end < len(text) and not (text[end - 1] == "\n" and not text[end].isspace()
                                       and not text[end - 2].isspace()):
            end += 1
        yield text[start:end]
        start = end
