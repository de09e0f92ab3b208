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
    """presets.MOE_VARIANTS (the CLI's --variant, notebooks 03 and 06) holds the configurations the
    sweep measured: its best variant and its best top-1 setting, MoE in every block."""
    from moe_tutorial.presets import MOE_VARIANTS
    from moe_tutorial.sweep import moe_config

    assert MOE_VARIANTS["fine-grained + shared"] == moe_config("E=32 k=3 (C) + shared, aux-loss-free")
    assert MOE_VARIANTS["Switch top-1"] == moe_config("top-1 E=8")
    assert MOE_VARIANTS["top-2"] == moe_config("E=16 k=2 (2C)")


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
