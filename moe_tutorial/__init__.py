"""moe-tutorial: the finalized code of the course, one module per idea.

data              corpora (verified downloads), CharTokenizer, batches
tokenizers        GPT-2's BPE (tiktoken r50k_base) from the data cache
attention         naive, FlashAttention-2 in PyTorch, SDPA; one `attention()` entry point
triton_attention  the flash forward as a Triton kernel (GPU; tested through the interpreter)
model             GPTConfig, GPT (GPT-2 parameter names); MoE through config fields
kv_cache          keys and values of past positions, for decoding
sampling          temperature, top-k, top-p
router            token-choice and expert-choice routing, capacity, balancing losses, metrics
experts           stacked expert weights, grouped matmul
dispatch          sort / einsum / loop dispatch of tokens to experts
moe               the Mixture-of-Experts layer (routed + optional shared experts), dropless()
train             TrainConfig, train() (also under torchrun), checkpoints, the command line
presets           named recipes ("char", ...), GPT-2 shapes and GPT-2 MoE presets
costs             model_info: total/active parameters, FLOPs per token, training memory
pretrained        from_pretrained (GPT-2 from the Hub, safetensors), save_pretrained
upcycle           sparse upcycling of a dense model into an MoE
distributed       torchrun setup, DDP, expert parallelism with all-to-all
measure           median timings and peak memory in a fresh process
viz               the routing explorer and its static rendering
exercises         the checks behind the notebooks' exercises
"""

__version__ = "0.1.0"
