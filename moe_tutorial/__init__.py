"""moe-tutorial: the finalized code of the course, one module per idea.

The course, chapter by chapter, and the modules each one introduces (every module's docstring
names its chapter too):

01 char GPT          downloads (verified cache), data, tokenizers (characters), model (GPTConfig in
                     config), sampling, train, evaluate, history, checkpoint, cli, presets
02 flash attention   attention (naive / FlashAttention-2 / SDPA; model.Kernels picks one),
                     triton_attention, measure
03 Switch MoE        config (MoEConfig), router, experts, dispatch (sort), moe, viz (routing explorer),
                     diagrams (the pictures of 03, 02 and 06, drawn as code)
04 top-2 and beyond  router variants (top-k, noisy, random second expert, expert choice,
                     aux-loss-free bias), moe (shared experts), dispatch (einsum, loop),
                     seeds (mean ± sd over seeds, and ties)
05 GPT-2 MoE         presets (GPT-2 shapes), costs, tokenizers (GPT-2 BPE), pretrained, upcycle,
                     kv_cache, course (notebook 01's model, shared by later chapters)
06 distributed MoE   distributed (DDP, expert parallelism, all-to-all)
07 modern MoE        norms (RMSNorm), rope, attention (grouped-query repeat_kv), model (QK-norm,
                     SwiGLU), router (sigmoid scoring, group-limited routing, sequence-wise loss),
                     optimizers (Muon)
08 a real MoE        hf_models (Llama, Mixtral, Qwen3-MoE, OLMoE checkpoints, Hub downloads),
                     analysis (routing measurements)
all                  exercises (the checks behind every notebook's exercises)

Import direction, bottom to top: config, downloads -> tokenizers -> data; attention, norms, rope,
router, experts -> dispatch -> moe -> model; distributed; then evaluate, history, checkpoint, train,
presets, cli, hf_models, pretrained, upcycle, course, analysis. Nothing imports upward
(tests/test_imports.py walks the graph).
"""

__version__ = "0.1.0"
