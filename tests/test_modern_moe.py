"""benchmarks/modern_moe.py: the records its --quick subset writes, the resume, the race's schedule by
elapsed time, and the committed results behind notebook 07's claim."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, copy_into

FIELDS = {"comparison", "block", "variant", "seed", "steps", "val_loss", "train_loss", "seconds", "active_params",
          "total_params", "n_experts", "top_k", "expert_hidden", "n_shared_experts", "aux_loss_free",
          "capacity_factor_train", "optimizer", "muon_experts", "evaluated", "machine", "command"}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("modern_moe", ROOT / "benchmarks" / "modern_moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_records_every_run_and_resumes(tmp_path, shakespeare_file):
    copy_into(shakespeare_file, tmp_path / "cache" / "tinyshakespeare.txt")
    out = tmp_path / "runs.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "modern_moe.py"), "--quick", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "MOE_TUTORIAL_DATA": str(tmp_path / "cache")}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    runs = json.loads(out.read_text())["runs"]
    steps = [r for r in runs if r["comparison"] == "equal_steps"]
    assert len(steps) == 6 and all(FIELDS <= r.keys() for r in steps)  # 3 variants x 2 seeds
    assert {r["muon_experts"] for r in steps if r["n_experts"]} == {False, True}
    assert all(r["block"] == "modern" and r["evaluated"] == "dropless" and r["optimizer"] == "muon" for r in runs)
    dense = next(r for r in steps if r["variant"] == "dense")
    moe = next(r for r in steps if r["n_experts"])
    assert abs(moe["active_params"] / dense["active_params"] - 1) < 0.03  # equal active compute per token
    assert moe["total_params"] > 4 * dense["total_params"]
    race = [r for r in runs if r["comparison"] == "equal_time"]
    assert sorted(r["variant"] for r in race) == sorted(["dense", "fine-grained + shared, Muon experts"] * 2)
    assert all(r["budget_seconds"] == 2.0 and 2.0 <= r["seconds"] < 10 and r["steps"] >= 1 for r in race)
    assert "equal_time at 2 s" in first and ("tie" in first or "better" in first or "worse" in first)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    assert len(json.loads(out.read_text())["runs"]) == len(runs)  # nothing trained twice
    assert "seed 13" not in again


def test_race_schedule_follows_the_elapsed_fraction_of_the_budget(monkeypatch):
    """With a clock that moves 1 s per step, a 100 s race takes 100 steps, warms up and decays as the
    recipe does over its max_iters, whatever max_iters is."""
    benchmark = load_benchmark()
    now = [0.0]
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: now[0])
    rates = []

    def fake_step(net, model, optimizer, batches, cfg, lr):
        rates.append(lr)
        now[0] += 1.0

    monkeypatch.setattr(benchmark, "train_step", fake_step)
    model, cfg = benchmark.build("dense", 65, seed=0, steps=1000)
    dataset = type("D", (), {"train": torch.zeros(10_000, dtype=torch.long)})()
    assert benchmark.train_for_seconds(model, dataset, cfg, budget=100.0) == 100
    assert rates == [benchmark.learning_rate_at(10 * i, cfg) for i in range(100)]  # step i at fraction i/100
    assert max(rates) == pytest.approx(cfg.learning_rate, rel=0.05)
    assert rates[-1] < cfg.min_lr + 0.02 * cfg.learning_rate  # the cosine has decayed by the budget's end


def test_committed_results_back_notebook_07():
    """Every committed run is complete, and the equal-steps comparison at the recipe has 3 seeds of
    each variant (what notebook 07's table reads)."""
    benchmark = load_benchmark()
    runs = json.loads(benchmark.RESULTS.read_text())["runs"]
    assert all(FIELDS <= r.keys() for r in runs)
    at_recipe = [r for r in runs if r["comparison"] == "equal_steps" and r["steps"] == benchmark.MODERN_STEPS]
    for variant in benchmark.VARIANTS:
        assert sorted(r["seed"] for r in at_recipe if r["variant"] == variant) == list(benchmark.SEEDS)
