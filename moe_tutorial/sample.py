"""Generate text from a trained model: a prompt in, text printed as it is sampled; or a chat.

    python -m moe_tutorial.sample --out-dir out --prompt "ROMEO:" --max-new-tokens 300
    python -m moe_tutorial.sample --out-dir out --prompt "KING" --show-routing
    python -m moe_tutorial.sample --out-dir out --chat
    python -m moe_tutorial.sample --model gpt2 --prompt "The meaning of life is" --top-p 0.9

--out-dir reads a training run's ckpt.pt (its tokenizer is stored in it); --model reads a folder
written by save_pretrained or transformers, or a Hub name (gpt2, or org/name of a Llama, Mixtral,
Qwen3-MoE or OLMoE model). The same --seed gives the same text. An MoE generates dropless: every
token reaches its experts. Errors are one line on stderr with exit status 2, as in training.
"""

import sys
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, model_from_checkpoint
from .cli import USER_ERRORS, OneLineParser, at_least, check_device
from .hf_models import hub_cache
from .model import GPT
from .moe import MoE, dropless
from .pretrained import from_pretrained
from .sampling import check_sampling_args
from .tokenizers import GPT2_VOCAB_SIZE, CharTokenizer, GPT2Tokenizer, HFTokenizer, start_of_text
from .train import DTYPES


def load_run(out_dir):
    """A training run's model and the tokenizer it was trained with, from OUT_DIR/ckpt.pt."""
    ckpt = Path(out_dir) / "ckpt.pt"
    if not ckpt.exists():
        raise FileNotFoundError(f"--out-dir {out_dir}: there is no ckpt.pt there; train one with python -m "
                                f"moe_tutorial.train --out-dir {out_dir}, or give a saved model with --model")
    state = load_checkpoint(ckpt)  # verified: a damaged file is refused with the reason
    return model_from_checkpoint(state), run_tokenizer(state.get("extra", {}), ckpt)


def run_tokenizer(extra: dict, source):
    """The tokenizer a checkpoint names in its `extra`: GPT-2's BPE, or its own characters."""
    if extra.get("tokenizer") == "gpt2":
        return GPT2Tokenizer(progress=False)
    if "chars" in extra:
        return CharTokenizer(extra["chars"])
    raise ValueError(f"{source} names no tokenizer (no 'chars' or 'tokenizer' in its extra): it was written by "
                     f"train() without one; pass extra={{'chars': tokenizer.chars}} to train(), or save_pretrained "
                     f"the model and sample it with --model")


def load_model(name_or_dir, dtype: torch.dtype):
    """A saved or pretrained model (moe_tutorial.pretrained.from_pretrained) and its tokenizer: the
    folder's tokenizer.json if it has one, else GPT-2's BPE for a model with GPT-2's vocabulary."""
    model = from_pretrained(name_or_dir, dtype=dtype)
    path = Path(name_or_dir)
    folder = path if path.is_dir() else hub_cache(str(name_or_dir)) if "/" in str(name_or_dir) else None
    if folder is not None and (folder / "tokenizer.json").exists():
        return model, HFTokenizer(folder)
    if model.config.vocab_size == GPT2_VOCAB_SIZE:
        return model, GPT2Tokenizer(progress=False)
    raise FileNotFoundError(f"--model {name_or_dir}: no tokenizer.json beside the weights, and its vocabulary "
                            f"({model.config.vocab_size}) is not GPT-2's; for a run you trained, use --out-dir")


class TextStream:
    """The text of a growing list of token ids, handed out as soon as it can be printed: a
    character whose bytes are split over two BPE tokens is printed once both have arrived."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.text
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


def write_continuation(model, prompt_ids, tokenizer, args, generator, write, stop_text=None, stop_id=None):
    """Sample up to --max-new-tokens after `prompt_ids`, writing the text as it comes; stop early at
    `stop_id` (not written) or once the text ends with `stop_text`. Returns the TextStream and, with
    --show-routing, each generated token's routing (one list of per-layer Routing per token)."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids[-model.config.block_size:]], device=device)  # (1, T)
    stream, read_routing = TextStream(tokenizer), []
    steps = model.stream(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator,
                         return_routing=args.show_routing)
    for step in steps:
        token = step.token.item()
        read_routing.append(step.routing)  # the routing of the token read to predict this one
        if token == stop_id:
            break
        write(stream.push(token))
        if stop_text and stream.text.endswith(stop_text):
            break
    steps.close()
    if not args.show_routing or not stream.ids:
        return stream, []
    # Step i read generated token i-1; the last generated token is read by one more forward pass.
    context = torch.tensor([(prompt_ids + stream.ids)[-model.config.block_size:]], device=device)
    with torch.no_grad(), dropless(model):
        last = [r.last_positions(1) for r in model(context, return_routing=True).routing]
    return stream, read_routing[1:len(stream.ids)] + [last]


def format_routing(tokenizer, ids, routing, layers) -> str:
    """One line per generated token: the experts it went to in each MoE layer, heaviest first."""
    cells = [[" ".join(str(e) for e in layer.expert[0][layer.kept[0]].tolist()) or "-" for layer in token_routing]
             for token_routing in routing]
    width = max([len(c) for row in cells for c in row] + [len(f"layer {i}") for i in layers])
    header = "token  " + "  ".join(f"{f'layer {i}':<{width}}" for i in layers)
    lines = [(f"{repr(tokenizer.decode([t]))[:6]:<6} " + "  ".join(f"{c:<{width}}" for c in row)).rstrip()
             for t, row in zip(ids, cells)]
    return "\n".join(["experts each generated token went to (dropless; heaviest first):", header, *lines])


def moe_layer_ids(model: GPT) -> list[int]:
    return [i for i, block in enumerate(model.transformer.h) if isinstance(block.mlp, MoE)]


def render_chat(template: str, messages: list[dict], tokenizer) -> str:
    """A chat template (Jinja, from tokenizer_config.json) filled in, as transformers does it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")


def chat(model, tokenizer, args, stdin, write):
    """Read a line, answer it, repeat. A base model continues the conversation's text (a reply ends
    at a blank line); a model with a chat template gets the conversation in its template (a reply
    ends at its end-of-sequence token). The oldest text is dropped once the context is full."""
    template = getattr(tokenizer, "chat_template", None)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    messages, text = [], ""
    interactive = stdin.isatty()
    how = "its chat template" if template else "a base model: it continues your text, each reply ends at a blank line"
    write(f"chat ({how}); /reset forgets the conversation, /quit or Ctrl-D ends\n")
    room = max(1, model.config.block_size - args.max_new_tokens)  # prompt tokens that leave room to answer
    try:
        while True:
            if interactive:
                write("> ")
            line = stdin.readline()
            if not interactive and line:
                write(f"> {line}" if line.endswith("\n") else f"> {line}\n")  # a transcript that reads like a chat
            if not line or line.strip() == "/quit":
                break
            if line.strip() == "/reset":
                messages, text = [], ""
                write("(conversation forgotten)\n")
                continue
            if not line.strip():
                continue
            if template:
                messages.append({"role": "user", "content": line.rstrip("\n")})
                prompt_ids = tokenizer.encode(render_chat(template, messages, tokenizer))
                while len(messages) > 1 and len(prompt_ids) > room:
                    messages = messages[2:] if len(messages) > 2 else messages[1:]  # oldest exchange first
                    prompt_ids = tokenizer.encode(render_chat(template, messages, tokenizer))
                stop = dict(stop_id=tokenizer.eos_token_id)
            else:
                text += line if line.endswith("\n") else line + "\n"
                prompt_ids, stop = tokenizer.encode(text)[-room:], dict(stop_text="\n\n")
            stream, routing = write_continuation(model, prompt_ids, tokenizer, args, generator, write, **stop)
            reply = stream.text
            if template:
                messages.append({"role": "assistant", "content": reply})
            else:
                text += reply
            write("" if reply.endswith("\n") else "\n")
            if routing:
                write(format_routing(tokenizer, stream.ids, routing, moe_layer_ids(model)) + "\n")
    except KeyboardInterrupt:  # Ctrl-C ends the chat, not with a traceback
        write("\n")


def write_samples(model, tokenizer, args, prompt, write):
    prompt_ids = tokenizer.encode(prompt) if prompt is not None else start_of_text(tokenizer)
    if not prompt_ids:
        raise ValueError("the prompt is empty: give some text with --prompt, or leave it out to start afresh")
    for i in range(args.num_samples):
        if args.num_samples > 1:
            write(f"--- sample {i + 1} of {args.num_samples} ---\n")
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed + i)
        write(prompt or "")
        stream, routing = write_continuation(model, prompt_ids, tokenizer, args, generator, write)
        write("\n")
        if routing:
            write(format_routing(tokenizer, stream.ids, routing, moe_layer_ids(model)) + "\n")


def parse_args(argv):
    parser = OneLineParser(prog="python -m moe_tutorial.sample",
                           description="Generate text from a training run (--out-dir) or a saved model (--model).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--out-dir", help="a training run's folder: its ckpt.pt")
    source.add_argument("--model", help="a save_pretrained or transformers folder, or a Hub name (gpt2, org/name)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="text to continue (default: start of a document)")
    prompt.add_argument("--prompt-file", help="a UTF-8 file whose text to continue")
    parser.add_argument("--num-samples", type=at_least(1), default=1,
                        help="independent samples (seeds SEED, SEED+1, ...)")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=300, help="tokens to generate per sample/reply")
    parser.add_argument("--temperature", type=float, default=0.8, help="< 1 sharper, > 1 more random (default 0.8)")
    parser.add_argument("--top-k", type=at_least(1), help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, help="sample within the smallest set of tokens holding this probability")
    parser.add_argument("--seed", type=int, default=1337, help="the same seed gives the same text")
    parser.add_argument("--chat", action="store_true", help="talk to the model: one line in, one reply out")
    parser.add_argument("--show-routing", action="store_true",
                        help="for an MoE: the experts each generated token went to, layer by layer")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights' dtype")
    parser.add_argument("--threads", type=at_least(1), help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.chat and (args.prompt is not None or args.prompt_file or args.num_samples > 1):
        parser.error("--chat reads its prompts from the keyboard (or stdin): drop --prompt/--prompt-file/--num-samples")
    return parser, args


def main(argv=None, stdin=None, stdout=None):
    parser, args = parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    def write(text):
        stdout.write(text)
        stdout.flush()  # each token as it is sampled

    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p)
        check_device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
        model, tokenizer = load_run(args.out_dir) if args.out_dir else load_model(args.model, DTYPES[args.dtype])
        model = model.to(args.device, DTYPES[args.dtype]).eval()
        if args.show_routing and not model.moe_layers():
            raise ValueError("--show-routing: this model has no MoE layers (it is dense); drop --show-routing")
        if args.chat:
            chat(model, tokenizer, args, stdin, write)
        else:
            write_samples(model, tokenizer, args, prompt, write)
    except (*USER_ERRORS, ImportError, ConnectionError, UnicodeDecodeError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C while loading or sampling: stop, without a traceback
        write("\n")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
