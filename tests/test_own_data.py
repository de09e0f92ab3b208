"""Training on your own text (--data, --tokenizer), the GPT-2 presets from the command line, and
browser tests that skip on a machine without a browser."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, copy_into, course_data_file

from moe_tutorial import data
from moe_tutorial.checkpoint import load_checkpoint
from moe_tutorial.cli import main
from moe_tutorial.data import shakespeare_dataset, text_dataset
from moe_tutorial.presets import BPE_PRESETS, preset
from moe_tutorial.tokenizers import GPT2_VOCAB_SIZE, R50K_FILENAME, GPT2Tokenizer


@pytest.fixture
def cache(data_cache, shakespeare_file):
    copy_into(shakespeare_file, data_cache / "tinyshakespeare.txt")
    copy_into(course_data_file(R50K_FILENAME), data_cache / R50K_FILENAME)
    return data_cache


def test_own_text_in_characters_is_what_shakespeare_gives(cache, shakespeare_file):
    mine, theirs = text_dataset(shakespeare_file, "char", progress=False), shakespeare_dataset(progress=False)
    assert torch.equal(mine.train.long(), theirs.train) and torch.equal(mine.val.long(), theirs.val)
    assert mine.tokenizer.chars == theirs.tokenizer.chars and mine.train.dtype == torch.uint16


def test_tokens_are_cached_by_the_texts_sha256(cache, tmp_path, monkeypatch):
    corpus = tmp_path / "mine.txt"
    corpus.write_text("to be or not to be\n" * 200)
    first = text_dataset(corpus, "char", progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(data.CharTokenizer, "encode", lambda *a: pytest.fail("tokenized twice"))
        again = text_dataset(corpus, "char", progress=False)  # read back from the memory-mapped file
    assert torch.equal(first.train, again.train)
    corpus.write_text("to be or not to be!\n" * 200)  # a new text, a new token file
    assert len(text_dataset(corpus, "char", progress=False).train) > len(first.train)
    assert len(list((cache / "tokens").glob("*.bin"))) == 2


def test_a_damaged_token_file_is_rebuilt(cache, tmp_path):
    corpus = tmp_path / "mine.txt"
    corpus.write_text("abcdefgh\n" * 300)
    whole = text_dataset(corpus, "char", progress=False).train.clone()
    (bin_file,) = (cache / "tokens").glob("*.bin")
    bin_file.write_bytes(bin_file.read_bytes()[:100])  # truncated on disk
    assert torch.equal(text_dataset(corpus, "char", progress=False).train, whole)


def test_gpt2_tokens_in_pieces_are_the_tokens_of_the_whole(cache, shakespeare_file):
    text = shakespeare_file.read_text()[:60_000] + "end of a speech  \nNext\n \nline\t\nmore"  # runs of spaces
    tok = GPT2Tokenizer(progress=False)
    pieces = list(data._pieces(text, size=2_000))
    assert len(pieces) > 20 and "".join(pieces) == text
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_a_folder_of_txt_files_is_read_in_name_order(cache, tmp_path):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "2.txt").write_text("second\n" * 100)
    (folder / "a.txt").write_text("first\n" * 100)
    (folder / "notes.md").write_text("ignored")
    text, source = data.read_text(folder)
    assert text == "first\n" * 100 + "\n\n" + "second\n" * 100 and "2 .txt files" in source


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(b"caf\xe9 au lait\n" * 50), "is not UTF-8 text (byte 0xe9 at offset 3)"),
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: p.mkdir(), "no .txt files"),
    (lambda p: None, "no such file or folder"),
    (lambda p: p.write_text("too short\n"), "too short"),
])
def test_cli_refuses_data_it_cannot_train_on(cache, tmp_path, capsys, make, words):
    path = tmp_path / "mine.txt"
    make(path)
    with pytest.raises(SystemExit) as exit_:
        main(["--preset", "char-tiny", "--data", str(path), "--max-iters", "2", "--sample", "0", "--no-progress",
              "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_cli_trains_on_your_text_and_resumes_only_on_the_same_vocabulary(cache, tmp_path, capsys):
    corpus = tmp_path / "mine.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 100)
    args = ["--preset", "char-tiny", "--data", str(corpus), "--max-iters", "4", "--sample", "20", "--no-progress",
            "--threads", "1", "--out-dir", str(tmp_path / "out")]
    main(args)
    out = capsys.readouterr().out
    extra = load_checkpoint(tmp_path / "out" / "ckpt.pt")["extra"]
    assert extra["tokenizer"] == "char" and extra["chars"] == "\n abcdefghijklmnopqrstuvwxyz" and "mine.txt" in out
    corpus.write_text("THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG\n" * 100)  # same size, other characters
    with pytest.raises(SystemExit) as exit_:
        main([*args[:5], "8", *args[6:], "--resume"])
    assert exit_.value.code == 2 and "another vocabulary of characters" in capsys.readouterr().err


def test_gpt2_mini_presets_train_on_bpe_tokens_from_the_cli(cache, tmp_path, capsys):
    corpus = tmp_path / "mine.txt"
    corpus.write_text(course_data_file("tinyshakespeare.txt").read_text()[:40_000])
    main(["--preset", "gpt2-mini-moe", "--data", str(corpus), "--max-iters", "2", "--batch-size", "2",
          "--sample", "5", "--no-progress", "--threads", "1", "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    state = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert state["extra"]["tokenizer"] == "gpt2" and "chars" not in state["extra"]
    assert state["model_config"]["vocab_size"] == GPT2_VOCAB_SIZE and state["model_config"]["moe"]["n_experts"] == 8
    assert "gpt2 tokens" in out and "tokens/s" in out


@pytest.mark.parametrize("name", BPE_PRESETS)
def test_bpe_presets_are_gpt2_shaped(name):
    model_cfg, train_cfg = preset(name, GPT2_VOCAB_SIZE)
    assert model_cfg.bias and model_cfg.gelu_approximate == "tanh" and model_cfg.tie_embeddings
    assert (model_cfg.moe is not None) == ("moe" in name)
    if name in ("gpt2", "gpt2-moe-16x"):  # nanoGPT's train_gpt2 recipe: 12 x 1024 x 40 tokens per step
        assert model_cfg.block_size * train_cfg.batch_size * train_cfg.grad_accum_steps == 491_520


def test_browser_tests_skip_without_a_browser_unless_required():
    env = {**os.environ, "MOE_TUTORIAL_CHROMIUM": str(Path("/nonexistent/chromium"))}
    env.pop("MOE_TUTORIAL_REQUIRE_BROWSER", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/browser"]
    skipped = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    # exit status 5: pytest found no test to run (the module skipped itself)
    assert skipped.returncode in (0, 5) and "1 skipped" in skipped.stdout and "Chromium not found" in skipped.stdout
    required = subprocess.run(cmd + ["-x"], cwd=ROOT, env={**env, "MOE_TUTORIAL_REQUIRE_BROWSER": "1"},
                              capture_output=True, text=True, timeout=120)
    assert required.returncode != 0 and "Chromium not found" in required.stdout
