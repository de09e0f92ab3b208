"""Honest measurements: median wall time, and peak extra memory in a fresh process (notebooks
02 and 04, and the benchmarks).

Peak memory is read from the operating system: the process's resident-set high-water mark
(VmHWM), reset just before the measured call (Linux `/proc/self/clear_refs`; elsewhere the
`ru_maxrss` increase), minus the resident set at that moment. It counts every allocation, not
only PyTorch's. Each point runs in a new Python process, so no point inherits another's heap.

    python -m moe_tutorial.measure attention --impl flash --seq-len 4096 --backward
    python -m moe_tutorial.measure dispatch --dispatch einsum --tokens 4096 --n-experts 32
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from .attention import ATTENTION_IMPLS
from .dispatch import DISPATCH


def median_seconds(fn, repeats=5, warmup=1):
    """Median wall time of `fn()` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _proc_status_mib(key):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024  # reported in KiB


def reset_peak_rss() -> float:
    """Start a new high-water mark; returns the baseline (MiB) that `peak_rss_mib` is compared to."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current resident set
        return _proc_status_mib("VmRSS")
    except OSError:  # not Linux: the lifetime peak, which only works in a fresh process
        return peak_rss_mib()


def peak_rss_mib() -> float:
    """This process's peak resident memory (MiB): since the last `reset_peak_rss`, else since it started."""
    try:
        return _proc_status_mib("VmHWM")
    except OSError:  # no /proc: the lifetime peak, which Linux reports in KiB and macOS in bytes
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def attention_point(impl, seq_len, backward=False, batch=1, heads=8, head_dim=64, causal=True,
                    repeats=3, threads=2):
    """Time and peak extra memory of one attention call, measured in this process.

    Call it through `measure_in_subprocess`: the memory figure is only meaningful in a
    process that has done nothing bigger before.
    """
    from .attention import attention

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, generator=g) for _ in range(3))
    grad = torch.randn_like(q)
    for t in (q, k, v):
        t.requires_grad_(backward)

    def run():
        if backward:
            out = attention(q, k, v, causal=causal, impl=impl)
            torch.autograd.grad(out, (q, k, v), grad)
        else:
            with torch.no_grad():
                attention(q, k, v, causal=causal, impl=impl)

    small = [t[..., :64, :].detach().clone().requires_grad_(backward) for t in (q, k, v)]
    out = attention(*small, causal=causal, impl=impl)  # load kernels before the baseline
    if backward:
        out.sum().backward()
    baseline = reset_peak_rss()
    seconds_first = median_seconds(run, repeats=1, warmup=0)
    extra_mib = peak_rss_mib() - baseline
    seconds = median_seconds(run, repeats=repeats, warmup=0) if repeats > 1 else seconds_first
    return {"impl": impl, "seq_len": seq_len, "backward": backward, "seconds": seconds,
            "extra_mib": max(extra_mib, 0.0)}


def dispatch_point(dispatch, tokens, n_experts, n_embd=128, top_k=2, repeats=5, threads=2):
    """Forward+backward time and peak extra memory of one MoE layer with a given dispatch."""
    from .config import GPTConfig, MoEConfig
    from .moe import MoE

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=8, n_embd=n_embd, n_head=1, moe=MoEConfig(n_experts=n_experts, top_k=top_k))
    layer = MoE(config, dispatch).train()
    x = torch.randn(tokens // 64, 64, n_embd, requires_grad=True)

    def run():
        layer.zero_grad(set_to_none=True)
        layer(x)[0].sum().backward()  # the layer returns (output, aux_loss)

    small = torch.randn(1, 64, n_embd)
    layer(small)[0].sum().backward()  # load kernels before the baseline
    baseline = reset_peak_rss()
    run()
    extra_mib = peak_rss_mib() - baseline
    return {"dispatch": dispatch, "tokens": tokens, "n_experts": n_experts,
            "seconds": median_seconds(run, repeats=repeats, warmup=0), "extra_mib": max(extra_mib, 0.0)}


def measure_in_subprocess(kind, timeout=600, runs=1, **kwargs):
    """Run `python -m moe_tutorial.measure KIND --key value ...` and return its JSON result.

    With `runs` > 1, each run is a fresh process and the result with the median `extra_mib` is
    returned: a process's one-time allocations (a thread pool's stacks, an allocator arena) land in
    the measured call's peak in some processes and not in others, so a single run can read high.
    """
    cmd = [sys.executable, "-m", "moe_tutorial.measure", kind]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not False and value is not None:
            cmd += [flag, str(value)]
    results = sorted((_run_measurement(cmd, timeout) for _ in range(runs)), key=lambda r: r["extra_mib"])
    return results[len(results) // 2]


def _run_measurement(cmd, timeout):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Measure one point in a fresh process; prints JSON.")
    sub = parser.add_subparsers(dest="kind", required=True)
    att = sub.add_parser("attention")
    att.add_argument("--impl", required=True, choices=ATTENTION_IMPLS)
    att.add_argument("--seq-len", type=int, required=True)
    att.add_argument("--backward", action="store_true")
    att.add_argument("--heads", type=int, default=8)
    att.add_argument("--head-dim", type=int, default=64)
    att.add_argument("--repeats", type=int, default=3)
    att.add_argument("--threads", type=int, default=2)
    dis = sub.add_parser("dispatch")
    dis.add_argument("--dispatch", required=True, choices=list(DISPATCH))
    dis.add_argument("--tokens", type=int, required=True)
    dis.add_argument("--n-experts", type=int, required=True)
    dis.add_argument("--top-k", type=int, default=2)
    dis.add_argument("--repeats", type=int, default=5)
    dis.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.kind == "attention":
        result = attention_point(args.impl, args.seq_len, args.backward, heads=args.heads,
                                 head_dim=args.head_dim, repeats=args.repeats, threads=args.threads)
    else:
        result = dispatch_point(args.dispatch, args.tokens, args.n_experts, top_k=args.top_k,
                                repeats=args.repeats, threads=args.threads)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
