"""moe-tutorial: the finalized code of the course, one module per idea.

data              corpora (verified downloads), CharTokenizer, batches
attention         naive, FlashAttention-2 in PyTorch, SDPA; one `attention()` entry point
triton_attention  the flash forward as a Triton kernel (GPU; tested through the interpreter)
model             GPTConfig, GPT (GPT-2 parameter names); MoE through config fields
sampling          temperature, top-k, top-p
router            token-choice and expert-choice routing, capacity, balancing losses, metrics
experts           stacked expert weights, grouped matmul
dispatch          sort / einsum / loop dispatch of tokens to experts
moe               the Mixture-of-Experts layer (routed + optional shared experts)
train             TrainConfig, train(), checkpoints, the command line
presets           named recipes ("char", "nanogpt-cpu", "char-tiny")
measure           median timings and peak memory in a fresh process
viz               the routing explorer and its static rendering
exercises         the checks behind the notebooks' exercises
"""

__version__ = "0.1.0"
