"""The benchmark scripts run end to end at toy size (so they cannot rot), and their checks can fail."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def load_script(name: str):
    """Import a benchmark script as a module (``benchmarks/`` is not a package)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def run_script(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def step1(loss: float, chosen: float, rejected: float) -> dict:
    return {"step1": {"loss": loss, "logps/chosen": chosen, "logps/rejected": rejected}}


def test_agreement_check_flags_a_wrong_loss_and_different_logps():
    bench = load_script("bench_dpo_vs_trl")
    ln2 = math.log(2)
    agree = {"trl": [step1(ln2, -700.0, -650.0)], "concat": [step1(ln2, -700.01, -650.0)]}
    assert bench.check_agreement(agree) == []
    wrong = {"trl": [step1(ln2, -700.0, -650.0)], "concat": [step1(0.69, -700.0, -650.0)],
             "shared_prefix": [step1(ln2, -701.0, -650.0)]}
    problems = bench.check_agreement(wrong)
    assert len(problems) == 2
    assert problems[0].startswith("concat: step-1 loss")
    assert problems[1].startswith("shared_prefix: step-1 logps/chosen")


@pytest.mark.slow
def test_bench_dpo_vs_trl_toy_run(tmp_path):
    out = tmp_path / "dpo.json"
    proc = run_script("bench_dpo_vs_trl", "--toy", "--in-process", "--repeats", "1", "--warmup", "1", "--steps", "1",
                      "--out", str(out))
    result = json.loads(out.read_text())
    rows = {row["provider"]: row for row in result["rows"]}
    assert set(rows) == {"trl", "concat", "shared_prefix", "shared_prefix_precomputed"}
    assert result["problems"] == []
    for row in rows.values():
        assert row["samples_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["step1_loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert row["step1_logps_chosen"] == pytest.approx(rows["trl"]["step1_logps_chosen"], rel=1e-4)
    assert rows["trl"]["speedup"] == 1.0
    assert result["precompute"]["pairs"] == 2 * (1 + 1)  # batch 2 x (warm-up + timed) steps
    assert "| shared_prefix_precomputed |" in proc.stdout


@pytest.mark.slow
def test_bench_pipeline_toy_run(tmp_path):
    out = tmp_path / "pipeline.json"
    proc = run_script("bench_pipeline", "--toy", "--repeats", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["data"]["samples_per_s"]) == {"bare_decode", "bare_decode+processor", "preference_datamodule"}
    assert result["data"]["pairs"] == 16 and all(v > 0 for v in result["data"]["samples_per_s"].values())
    assert set(result["scoring"]["ms"]) == {"semantic_batched", "semantic_loop", "localization_batched",
                                            "localization_loop"}
    assert result["scoring"]["candidates"] == 16
    assert "| semantic |" in proc.stdout and "| localization |" in proc.stdout


@pytest.mark.slow
def test_bench_sft_step_toy_run():
    proc = run_script("bench_sft_step", "--images", "6", "--rounds", "1", "--warmup", "0", "--threads", "1")
    for provider in ("random+ga_per_query", "random+ga", "grouped+ga_per_query", "grouped+ga"):
        assert f"| {provider} |" in proc.stdout
    assert "| random+ga_per_query |" in proc.stdout and "1.00x |" in proc.stdout
