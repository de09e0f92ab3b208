"""GPT-2's byte-level BPE tokenizer (tiktoken's r50k_base), read from the data cache.

The ranks file is fetched like every other download of the course (streamed, sha256-checked,
atomic) into the data cache, so once it is there the tokenizer works offline. It has the
same interface as data.CharTokenizer: encode, decode, vocab_size.
"""

from .data import fetch

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
