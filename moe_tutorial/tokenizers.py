"""Tokenizers: characters (notebook 01), GPT-2's byte-level BPE (notebook 05), and a Hugging Face
checkpoint's tokenizer.json (notebook 08, `moe_tutorial.sample`).

All have the same interface: encode, decode, vocab_size. GPT-2's is tiktoken's r50k_base,
built from the ranks file that is fetched like every other download of the course (streamed,
sha256-checked, atomic) into the data cache, so once it is there it works offline.
"""

import json
from pathlib import Path

import torch

from .downloads import fetch


class CharTokenizer:
    """Maps each distinct character of a corpus to an integer id, and back."""

    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(
                f"Characters not in the vocabulary: {''.join(unknown)!r} ({unknown}). "
                f"Use only characters the tokenizer was built from."
            )
        return [self.stoi[ch] for ch in text]

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= i < len(self.chars)]
        if bad:
            raise ValueError(f"Token ids out of range [0, {len(self.chars)}): {bad[:5]}")
        return "".join(self.chars[i] for i in ids)

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_FILENAME = "r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_VOCAB_SIZE = 50257  # 50000 merges + 256 bytes + <|endoftext|>
END_OF_TEXT = "<|endoftext|>"


class GPT2Tokenizer:
    def __init__(self, progress: bool = True):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        from tiktoken_ext.openai_public import r50k_pat_str

        path = fetch(R50K_URL, R50K_FILENAME, R50K_SHA256, progress=progress)
        ranks = load_tiktoken_bpe(str(path), expected_hash=R50K_SHA256)
        self.encoding = tiktoken.Encoding(
            name="r50k_base", pat_str=r50k_pat_str, mergeable_ranks=ranks,
            special_tokens={END_OF_TEXT: GPT2_VOCAB_SIZE - 1}, explicit_n_vocab=GPT2_VOCAB_SIZE,
        )

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot_token(self) -> int:
        return self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        """Ordinary text only: a literal "<|endoftext|>" in the corpus is encoded as text."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"Token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self.encoding.decode(ids)


class HFTokenizer:
    """A Hugging Face checkpoint's tokenizer.json (Llama, Mixtral, Qwen3, OLMoE), read with the
    `tokenizers` package (the `real` extra), and its chat template from tokenizer_config.json if
    the folder has one."""

    def __init__(self, folder):
        folder = Path(folder)
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("reading tokenizer.json needs the `tokenizers` package: "
                              "pip install -e '.[real]'") from None
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        self.chat_template = config.get("chat_template")
        self.bos_token, self.eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str) -> list[int]:
        """Text as written: a chat template spells out its special tokens, so none are added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _token_text(token) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def start_of_text(tokenizer) -> list[int]:
    """What generation starts from without a prompt: GPT-2's end-of-text token (documents begin
    after it), a checkpoint's beginning-of-text token, or a newline (the first character if the
    vocabulary has none)."""
    if isinstance(tokenizer, GPT2Tokenizer):
        return [tokenizer.eot_token]
    if isinstance(tokenizer, HFTokenizer) and tokenizer.bos_token:
        return [tokenizer.tokenizer.token_to_id(tokenizer.bos_token)]
    if isinstance(tokenizer, CharTokenizer) and "\n" not in tokenizer.stoi:
        return [0]
    return tokenizer.encode("\n")
