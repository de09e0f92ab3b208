"""moe_tutorial.sample: generate from a training run or a saved model, stream it, chat with it,
show an MoE's routing; and GPT.stream, the generation loop it is built on."""

import io
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import copy_into, course_data_file

from moe_tutorial import sample, tokenizers
from moe_tutorial.cli import main as train_main
from moe_tutorial.model import GPT
from moe_tutorial.moe import dropless
from moe_tutorial.presets import preset
from moe_tutorial.pretrained import save_pretrained
from moe_tutorial.tokenizers import CharTokenizer, HFTokenizer


def tiny_moe(vocab_size=20, variant="top-2"):
    model_cfg, _ = preset("char-tiny", vocab_size, variant=variant)
    torch.manual_seed(0)
    return GPT(model_cfg).eval()


@pytest.mark.parametrize("prompt_length", [5, 30])  # 30 + 20 new tokens outgrow block_size=32: the window slides
def test_stream_yields_what_generate_returns(prompt_length):
    model = tiny_moe()
    idx = torch.randint(0, 20, (2, prompt_length))
    whole = model.generate(idx, 20, top_k=5, generator=torch.Generator().manual_seed(1))
    steps = list(model.stream(idx, 20, top_k=5, generator=torch.Generator().manual_seed(1), return_routing=True))
    assert torch.equal(torch.cat([idx, *(s.token for s in steps)], dim=1), whole)
    assert len(steps[0].routing) == len(model.moe_layers()) and steps[0].routing[0].expert.shape == (2, 2)


def test_stream_routing_is_the_routing_of_the_token_just_read():
    model = tiny_moe()
    idx = torch.randint(0, 20, (3, 6))
    steps = list(model.stream(idx, 4, generator=torch.Generator().manual_seed(0), return_routing=True))
    full = torch.cat([idx, *(s.token for s in steps)], dim=1)  # (3, 10)
    with torch.no_grad(), dropless(model):
        routing = model(full, return_routing=True).routing  # every position at once
    for i, step in enumerate(steps):  # step i read position 5 + i of each row
        rows = torch.arange(3) * full.size(1) + 5 + i
        for layer, stepped in zip(routing, step.routing):
            assert torch.equal(stepped.expert, layer.expert[rows])
            torch.testing.assert_close(stepped.weights, layer.weights[rows])


# --- the command line -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A char-tiny top-2 MoE trained for a few steps by the training CLI (its checkpoint stores its characters)."""
    folder = tmp_path_factory.mktemp("run")
    cache = folder / "cache"
    copy_into(course_data_file("tinyshakespeare.txt"), cache / "tinyshakespeare.txt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_TUTORIAL_DATA", str(cache))
        train_main(["--preset", "char-tiny", "--variant", "top-2", "--max-iters", "10", "--sample", "0",
                    "--no-progress", "--threads", "1", "--out-dir", str(folder / "out")])
    return folder / "out"


def run_sample(*argv, stdin=""):
    """moe_tutorial.sample in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old_err, sys.stderr = sys.stderr, err
    try:
        sample.main(list(argv), stdin=io.StringIO(stdin), stdout=out)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.stderr = old_err
    return code, out.getvalue(), err.getvalue()


def test_sample_continues_the_prompt_and_the_seed_fixes_the_text(run_dir):
    code, first, _ = run_sample("--out-dir", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "40")
    _, again, _ = run_sample("--out-dir", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "40")
    _, other, _ = run_sample("--out-dir", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--seed", "7")
    assert code == 0 and first == again != other
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 40 + 1  # one character per token, newline


def test_num_samples_are_the_seeds_in_turn(run_dir):
    _, two, _ = run_sample("--out-dir", str(run_dir), "--num-samples", "2", "--max-new-tokens", "20", "--seed", "3")
    _, second, _ = run_sample("--out-dir", str(run_dir), "--max-new-tokens", "20", "--seed", "4")
    assert two.count("--- sample") == 2 and two.rstrip("\n").endswith(second.rstrip("\n"))


def test_text_is_written_token_by_token(run_dir, monkeypatch):
    writes = []
    out = io.StringIO()
    out.write = lambda text: writes.append(text)  # every write, as the terminal receives it
    sample.main(["--out-dir", str(run_dir), "--prompt", "A", "--max-new-tokens", "15"], stdout=out)
    assert sum(1 for w in writes if len(w) == 1) >= 15  # one write per sampled character, not one at the end


def test_show_routing_lists_the_experts_a_dropless_forward_chooses(run_dir):
    code, out, _ = run_sample("--out-dir", str(run_dir), "--prompt", "KING", "--max-new-tokens", "12",
                              "--show-routing")
    text, table = out.split("experts each generated token went to")
    header, *rows = table.strip().splitlines()[1:]
    starts = [header.index(f"layer {i}") for i in (0, 1)] + [None]  # the columns, where their titles start
    assert code == 0 and len(rows) == 12
    model, tokenizer = sample.load_run(run_dir)
    ids = torch.tensor([tokenizer.encode(text.rstrip("\n"))])
    with torch.no_grad(), dropless(model.eval()):
        routing = model(ids, return_routing=True).routing
    for row, position in zip(rows, range(4, 16)):  # the generated tokens follow the 4 of the prompt
        cells = [row[a:b].strip() for a, b in zip(starts, starts[1:])]
        assert cells == [" ".join(map(str, layer.expert[position].tolist())) for layer in routing]


def test_text_stream_waits_for_a_whole_utf8_character():
    tok = tokenizers.GPT2Tokenizer.__new__(tokenizers.GPT2Tokenizer)  # decode only: no ranks file needed

    class Bytes:  # token i is byte i
        n_vocab = 256

        @staticmethod
        def decode(ids):
            return bytes(ids).decode("utf-8", errors="replace")

    tok.encoding = Bytes()
    stream = sample.TextStream(tok)
    pieces = [stream.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]


@pytest.mark.parametrize("argv, words", [
    (["--out-dir", "/nonexistent/run"], "there is no ckpt.pt there"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt", "naïve €"], "Characters not in the vocabulary"),
    (["--prompt", ""], "the prompt is empty"),
    (["--chat", "--prompt", "x"], "--chat reads its prompts"),
    (["--device", "cuda"], "no CUDA GPU"),
])
def test_bad_sampling_requests_get_one_line(run_dir, argv, words):
    argv = argv if argv[0] == "--out-dir" else ["--out-dir", str(run_dir), *argv]
    code, _, err = run_sample(*argv)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_show_routing_on_a_dense_model_is_refused(tmp_path, shakespeare_file, monkeypatch):
    copy_into(shakespeare_file, tmp_path / "cache" / "tinyshakespeare.txt")
    monkeypatch.setenv("MOE_TUTORIAL_DATA", str(tmp_path / "cache"))
    train_main(["--preset", "char-tiny", "--max-iters", "2", "--sample", "0", "--no-progress", "--threads", "1",
                "--out-dir", str(tmp_path / "dense")])
    code, _, err = run_sample("--out-dir", str(tmp_path / "dense"), "--show-routing")
    assert code == 2 and "no MoE layers" in err


# --- chat ---------------------------------------------------------------------------------------------------------

def test_chat_through_a_pipe_keeps_history_until_reset(run_dir, monkeypatch):
    prompts = []
    real = sample.write_continuation

    def spy(model, prompt_ids, tokenizer, *args, **kwargs):
        prompts.append(tokenizer.decode(prompt_ids))
        return real(model, prompt_ids, tokenizer, *args, **kwargs)

    monkeypatch.setattr(sample, "write_continuation", spy)
    code, out, _ = run_sample("--out-dir", str(run_dir), "--chat", "--max-new-tokens", "4",  # all fits in block 32
                              stdin="ROMEO:\nJULIET:\n/reset\nKING:\n/quit\nnever read\n")
    assert code == 0 and "(conversation forgotten)" in out and "never read" not in prompts[-1]
    assert prompts[0] == "ROMEO:\n" and prompts[1].startswith("ROMEO:\n") and prompts[1].endswith("JULIET:\n")
    assert prompts[2] == "KING:\n"  # /reset forgot the first two turns


def test_chat_template_carries_the_conversation(tmp_path, monkeypatch):
    folder = llama_folder_with_chat_template(tmp_path)
    prompts = []

    def fake_reply(model, prompt_ids, tokenizer, *args, **kwargs):
        prompts.append(prompt_ids)
        stream = sample.TextStream(tokenizer)
        stream.ids = tokenizer.encode("hello")
        return stream, []

    monkeypatch.setattr(sample, "write_continuation", fake_reply)
    code, out, _ = run_sample("--model", str(folder), "--chat", "--max-new-tokens", "4", stdin="hi there\nhow\n")
    tok = HFTokenizer(folder)
    assert code == 0 and "its chat template" in out
    assert prompts[0] == tok.encode("<|user|> hi there </s> <|assistant|>")
    assert prompts[1] == tok.encode("<|user|> hi there </s> <|assistant|> hello </s> <|user|> how </s> <|assistant|>")


def test_reply_stops_at_the_end_of_sequence_token(run_dir):
    model, tokenizer = sample.load_run(run_dir)
    args = sample.parse_args(["--out-dir", str(run_dir), "--max-new-tokens", "20"])[1]
    prompt = tokenizer.encode("ROMEO:")
    free, _ = sample.write_continuation(model, prompt, tokenizer, args, torch.Generator().manual_seed(0), lambda t: 0)
    stopped, _ = sample.write_continuation(model, prompt, tokenizer, args, torch.Generator().manual_seed(0),
                                           lambda t: 0, stop_id=free.ids[5])
    assert stopped.ids == free.ids[:free.ids.index(free.ids[5])]


def test_chat_in_a_real_process_through_a_pipe_ends_cleanly_on_ctrl_c(run_dir):
    proc = subprocess.Popen([sys.executable, "-m", "moe_tutorial.sample", "--out-dir", str(run_dir), "--chat",
                             "--max-new-tokens", "8", "--threads", "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("chat (")  # loaded, waiting for a line
    proc.stdin.write("ROMEO:\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "> ROMEO:\n"  # a piped chat echoes what it read, then answers
    reply = proc.stdout.readline()  # the reply, up to its first newline (8 tokens at most)
    time.sleep(0.5)  # the chat is waiting for the next line again
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err and 0 < len(reply) <= 9


def llama_folder_with_chat_template(tmp_path):
    """A random tiny Llama in transformers' layout, with a word-level tokenizer.json and a chat template."""
    transformers = pytest.importorskip("transformers")
    tokenizers_lib = pytest.importorskip("tokenizers")
    words = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "hi", "there", "how", "hello"]
    tok = tokenizers_lib.Tokenizer(tokenizers_lib.models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    tok.pre_tokenizer = tokenizers_lib.pre_tokenizers.WhitespaceSplit()
    tok.decoder = None
    folder = tmp_path / "llama"
    config = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {{ eos_token }} {% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>",
                                                              "eos_token": "</s>"}))
    return folder


def test_model_folder_uses_its_tokenizer_json(tmp_path):
    folder = llama_folder_with_chat_template(tmp_path)
    model, tok = sample.load_model(folder, torch.float32)
    assert isinstance(tok, HFTokenizer) and tok.eos_token_id == 2 and model.config.vocab_size == 9


def test_a_saved_char_model_without_a_tokenizer_is_refused(tmp_path):
    save_pretrained(tiny_moe(), tmp_path / "saved")
    code, _, err = run_sample("--model", str(tmp_path / "saved"))
    assert code == 2 and "no tokenizer.json" in err and "--out-dir" in err


def test_a_checkpoint_names_its_tokenizer():
    assert sample.run_tokenizer({"chars": "ab\n"}, "x").chars == "\nab"
    assert isinstance(sample.run_tokenizer({"chars": "ab", "tokenizer": "char"}, "x"), CharTokenizer)
    with pytest.raises(ValueError, match="names no tokenizer"):
        sample.run_tokenizer({}, "ckpt.pt")
