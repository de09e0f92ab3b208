"""benchmarks/moe_scaling.py: its --quick subset writes the records the README and notebook read,
one per run (equal steps, step times, equal time), and a second invocation resumes instead of
training again."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, copy_into

FIELDS = {"comparison", "variant", "seed", "steps", "val_loss", "train_loss", "seconds", "active_params",
          "total_params", "n_experts", "top_k", "expert_hidden", "moe_every", "n_shared_experts", "machine",
          "command"}


def test_quick_sweep_records_every_run_and_resumes(tmp_path, shakespeare_file):
    copy_into(shakespeare_file, tmp_path / "cache" / "tinyshakespeare.txt")
    out = tmp_path / "runs.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "moe_scaling.py"), "--quick", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "MOE_TUTORIAL_DATA": str(tmp_path / "cache"), "MPLBACKEND": "Agg"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    runs = json.loads(out.read_text())["runs"]
    trained = [r for r in runs if r["comparison"] == "equal_steps"]
    assert len(trained) == 6 and all(FIELDS <= r.keys() for r in trained)
    assert {r["variant"] for r in trained} == {"dense", "top-1 E=8", "E=32 k=4 (C)"}
    assert all(r["active_params"] <= r["total_params"] and 1.0 < r["val_loss"] < 4.5 for r in trained)
    assert {r["machine"]["threads"] for r in trained} == {1} and "--quick" in trained[0]["command"]
    speed = [r for r in runs if r["comparison"] == "step_time"]
    assert len(speed) == 3 and all(r["seconds_per_step"] > 0 for r in speed)
    timed = [r for r in runs if r["comparison"] == "equal_time"]  # dense and the quick sweep's best MoE, 3 s each
    best = min(("top-1 E=8", "E=32 k=4 (C)"), key=lambda v: sum(r["val_loss"] for r in trained if r["variant"] == v))
    assert sorted(r["variant"] for r in timed) == sorted(["dense", best])
    assert all(r["budget_seconds"] == 3.0 and r["seconds_per_step"] > 0 for r in timed)
    assert all(r["steps"] == max(1, int(3.0 / r["seconds_per_step"])) for r in timed)  # steps from its own probe
    assert "tie" in first or "better" in first or "worse" in first  # every MoE row gets a verdict vs dense
    assert " in " in first.split("equal_time")[-1]  # an equal-time row shows its steps and its own seconds
    assert (tmp_path / "runs.png").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    assert len(json.loads(out.read_text())["runs"]) == len(runs)  # nothing trained twice
    assert "seed" not in again.split("comparison")[0]  # no training lines before the table


def test_the_courses_moe_variants_are_the_sweeps_winners():
    """presets.MOE_VARIANTS (the CLI's --variant, notebooks 03 and 06) are sweep variants: in the
    committed benchmarks/results/moe_scaling.json, "fine-grained + shared" is the best at equal steps
    and "Switch top-1" ties the best top-1 setting; each name says what its config does."""
    from moe_tutorial.presets import MOE_VARIANTS, SWEEP_VARIANT_OF
    from moe_tutorial.seeds import verdict
    from moe_tutorial.sweep import FAMILIES

    runs = json.loads((ROOT / "benchmarks" / "results" / "moe_scaling.json").read_text())["runs"]
    losses = {}
    for r in runs:
        if r["comparison"] == "equal_steps" and r["steps"] == 1800:  # the char recipe's steps
            losses.setdefault(r["variant"], []).append(r["val_loss"])
    mean = {v: sum(x) / len(x) for v, x in losses.items()}
    assert SWEEP_VARIANT_OF["fine-grained + shared"] == min(set(mean) - {"dense"}, key=mean.get)
    best_top1 = min(FAMILIES["top-1, full-width experts"], key=mean.get)
    assert verdict(losses[SWEEP_VARIANT_OF["Switch top-1"]], losses[best_top1]) == "tie"

    switch, fine, top2, aux_free = (MOE_VARIANTS[n] for n in ("Switch top-1", "fine-grained + shared", "top-2",
                                                               "aux-loss-free top-1"))
    assert (switch.top_k, top2.top_k, aux_free.top_k, fine.n_shared_experts) == (1, 2, 1, 1)
    for balanced_by_bias in (fine, aux_free):  # DeepSeek-V3's selection bias instead of the balancing loss
        assert balanced_by_bias.aux_loss_coef == 0 and balanced_by_bias.bias_update_rate > 0
    assert MOE_VARIANTS["dense"] is None and all(c.every == 1 for c in MOE_VARIANTS.values() if c)


def test_sweep_names_derived_variants_and_refuses_unknown_ones():
    from moe_tutorial.sweep import FAMILIES, VARIANTS, base_variant, moe_config

    assert all(v in VARIANTS for members in FAMILIES.values() for v in members)
    assert moe_config("dense") is None and base_variant("E=32 k=4 (C), every other block") == "E=32 k=4 (C)"
    every_other, aux_free = moe_config("top-1 E=8, every other block"), moe_config("top-1 E=8, aux-loss-free")
    assert (every_other.every, every_other.aux_loss_coef) == (2, moe_config("top-1 E=8").aux_loss_coef)
    assert (aux_free.every, aux_free.aux_loss_coef, aux_free.bias_update_rate) == (1, 0.0, 1e-3)
    with pytest.raises(ValueError, match="Unknown sweep variant 'top-1 E=12'"):
        moe_config("top-1 E=12")
    with pytest.raises(ValueError, match="dense has no MoE layers"):
        moe_config("dense, aux-loss-free")


def test_the_table_reads_the_committed_runs_and_keeps_routing_records_apart():
    """sweep.summary: one row per variant and budget, verdicts by the 2-sd rule; the routing
    diagnosis's records are reported in a table of their own, never as a comparison's row."""
    from moe_tutorial.sweep import format_table, load_runs, routing_table, summary

    runs = load_runs()
    rows = summary(runs)
    dense = next(r for r in rows if r.comparison == "equal_steps" and r.budget == 1800 and r.variant == "dense")
    assert dense.verdict == "" and dense.vs_dense == 0 and len(dense.losses) == 3
    assert {r.verdict for r in rows if r.variant != "dense"} <= {"better", "worse", "tie", "n<2"}
    diagnosis = dict(comparison="routing", variant="top-1 E=16", seed=1, steps=1800, val_loss=2.0,
                     max_share=[0.9, 0.3], dropped_pct=[40.0, 2.5], loss_through_training=[3.0, 2.1],
                     max_share_through_training=[0.5, 0.9])
    assert [r.__dict__ for r in summary(runs + [diagnosis])] == [r.__dict__ for r in rows]
    assert "seed 1: val loss 2.0000" in routing_table([diagnosis]) and "0.90 0.30" in routing_table([diagnosis])
    assert format_table(rows).count("\n") == len(rows)  # a header and one line per row
