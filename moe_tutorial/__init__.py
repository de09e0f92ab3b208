"""moe-tutorial: the finalized code of the course, one module per idea.

The package map: each chapter, the modules it introduces (every module's docstring names its
chapter too), and the one thing to read first.

chapter              modules                                            read first
01 char GPT          config, model, data, tokenizers, sampling, train,  model.GPT, then train.train_step
                     evaluate, history, checkpoint, downloads, cli,
                     sample, presets
02 flash attention   attention, triton_attention, measure               attention.flash_attention
03 Switch MoE        router, experts, dispatch, moe, viz, diagrams      moe.MoE.forward, then router.Router.forward
04 top-2 and beyond  router (variants), moe (shared experts),           router.Router.select
                     seeds, sweep
05 GPT-2 MoE         costs, serving, dispatch (einsum, loop),           upcycle.upcycle
                     pretrained, upcycle, kv_cache, cached_models,
                     tokenizers (GPT-2 BPE)
06 distributed MoE   distributed (DDP, expert parallelism, all-to-all), distributed.ExpertParallelDispatch
                     sharded_checkpoint
07 modern MoE        norms, rope, optimizers (Muon), router (sigmoid,   model.Block, then router.Router.affinity
                     groups, sequence-wise loss), mla (latent attention)
08 a real MoE        hf_models, analysis                                analysis.collect_routing
all                  exercises (the checks behind every notebook's exercises)

Routing travels in outputs: an MoE layer returns (out, aux_loss, routing), the dense MLP the same
with no routing, and GPT.forward(idx, return_routing=True) returns one router.Routing per MoE layer.

Import direction, bottom to top: config, downloads -> tokenizers -> data; attention, norms, rope,
router, experts -> dispatch -> moe -> model; norms, rope -> mla; config -> serving (nothing else from
the package); distributed; then evaluate, history, checkpoint, sharded_checkpoint, train, sweep,
presets, cli, hf_models, pretrained, sample, upcycle, cached_models, analysis. Nothing imports upward
(tests/test_imports.py walks the graph).
"""

__version__ = "0.1.0"
