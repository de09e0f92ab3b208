"""moe-tutorial: the finalized code of the course, one module per idea.

data       corpora (verified downloads), CharTokenizer, batches
attention  naive, FlashAttention-2 in PyTorch, SDPA; one `attention()` entry point
model      GPTConfig, GPT (GPT-2 parameter names)
sampling   temperature, top-k, top-p
train      TrainConfig, train(), checkpoints, the command line
presets    named recipes ("char", "nanogpt-cpu", "char-tiny")
exercises  the checks behind the notebooks' exercises
"""

__version__ = "0.1.0"
