"""`spladectl bench`: real (tiny) training steps per precision, the max-batch search, errors, the plot."""

from __future__ import annotations

import json

import psutil
import pytest

from spladectl.bench.max_batch import search_max_batch
from spladectl.bench.run import combine_rounds
from spladectl.bench.settings import parse_precisions
from spladectl.errors import SpladectlError

SMALL = ("--steps", "2", "--warmup", "1", "--batch-size", "2", "--max-doc-length", "32", "--max-query-length", "16",
         "--threads", "1")


def _rows(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    # stdout holds only the JSON; progress went to stderr
    return json.loads(result.stdout)


def test_bench_json_rows_per_precision(cli):
    # The default: each precision in its own process (its own peak memory)
    rows = _rows(cli("bench", *SMALL, "--precisions", "32-true,bf16-mixed", "--json"))
    assert [r["precision"] for r in rows] == ["32-true", "bf16-mixed"]
    by = {r["precision"]: r for r in rows}
    assert by["32-true"]["status"] == "ok"
    assert by["32-true"]["speedup"] == 1.0
    for row in rows:
        if row["status"] == "skipped":  # a CPU without native bf16
            assert row["precision"] == "bf16-mixed" and row["reason"] and row["examples_per_s"] is None
            continue
        assert row["examples_per_s"] > 0
        assert row["median_step_s"] > 0 and row["batch_size"] == 2 and row["steps"] == 2
        assert row["peak_memory_gb"] > 0 and row["memory_kind"] == "RSS"
        assert row["step_flops"] > 0 and row["flops_source"] == "FlopCounterMode"
        assert row["matmul_peak_flops_per_s"] > 0 and 0 < row["matmul_share"] < 1.5
        # The peak is sampled after every timed step and each step is compared with its own sample.
        assert len(row["step_s"]) == len(row["matmul_peaks_flops_per_s"]) == 2
        shares = sorted(row["step_flops"] / s / p for s, p in zip(row["step_s"], row["matmul_peaks_flops_per_s"]))
        assert row["matmul_share"] == pytest.approx(sum(shares) / 2, abs=1e-4)
        assert row["matmul_share_range"] == pytest.approx([shares[0], shares[1]], abs=1e-4)
        assert row["optimizer"].startswith("AdamW")


def test_table_on_stdout_progress_on_stderr_and_a_png_plot(cli, tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "bench.png"
    result = cli("bench", *SMALL, "--steps", "1", "--precisions", "32-true", "--in-process", "--plot", str(target))
    assert result.exit_code == 0, result.output
    assert "32-true: step 1/1" in result.stderr and "plot written" in result.stderr
    assert "examples/s" in result.stdout and "matmul peak" in result.stdout
    assert "step 1/1" not in result.stdout
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_precision_is_a_clear_error(cli):
    result = cli("bench", "--precisions", "32-true,fp8", "--json")
    assert result.exit_code == 2
    assert "--precisions" in result.output and "fp8" in result.output and "bf16-mixed" in result.output


def test_parse_precisions_aliases_and_repeats():
    assert parse_precisions("fp32, bf16,32-true,fp16") == ["32-true", "bf16-mixed", "16-mixed"]
    with pytest.raises(SpladectlError):
        parse_precisions(" , ")


def test_find_max_batch_respects_a_small_budget(cli):
    # A real RSS budget: what this process holds now plus 400 MiB. A step at --max-doc-length 32 adds well under
    # that at batch 2 and a few MiB per example more, so the search must find a batch >= 2 and stop below it.
    budget = psutil.Process().memory_info().rss / 2**30 + 0.4
    result = cli("bench", *SMALL, "--steps", "1", "--precisions", "bf16-mixed", "--in-process", "--find-max-batch",
                 "--memory-budget", f"{budget:.3f}", "--json")
    (row,) = _rows(result)
    if row["status"] == "skipped":
        pytest.skip(row["reason"])
    best = row["max_batch_size"]
    assert best is not None and best >= 2
    assert row["memory_budget_gb"] == pytest.approx(budget, abs=1e-3)
    probes = row["max_batch_probes"]
    fitting = [p for p in probes if p["fits"]]
    assert fitting and all(p["peak_gb"] <= budget for p in fitting)
    assert max(p["batch_size"] for p in fitting) == best
    # the search stopped because a larger batch went over the budget (not because it ran out of batches to try)
    assert any(not p["fits"] and p["batch_size"] > best for p in probes)
    for p in probes:
        if not p["fits"] and p["peak_gb"] is not None:
            assert p["peak_gb"] > budget or "out of memory" in p["why"]


def test_search_max_batch_doubles_then_bisects():
    limit = 37  # the largest batch that "fits"
    calls = []

    def probe(b):
        calls.append(b)
        return b <= limit, float(b * 2**20), "" if b <= limit else "over"

    best, probes = search_max_batch(probe, 4, budget=limit * 2**20 * 1.0)
    assert calls[:4] == [4, 8, 16, 32]
    # 64 would need ~64 MiB by extrapolation, far over the 37 MiB budget: recorded, not run; then bisection
    assert probes[4] == {"batch_size": 64, "fits": False, "peak_gb": None, "predicted_gb": 0.062,
                         "why": "predicted over budget (not run)"}
    assert calls[4:] and all(32 < b < 64 for b in calls[4:])
    assert best >= 32 and best <= limit and limit - best <= max(1, best // 8)


def test_search_max_batch_halves_when_the_start_does_not_fit():
    best, probes = search_max_batch(lambda b: (b <= 3, float(b), ""), 16, budget=3.0)
    assert best == 3 and [p["batch_size"] for p in probes][:4] == [16, 8, 4, 2]
    assert search_max_batch(lambda b: (False, None, "oom"), 4, budget=1.0)[0] is None


def test_search_max_batch_skips_probes_predicted_far_over_budget():
    # 1 GiB + 1 GiB per example: batch 4 fits a 6 GiB budget, 8 would need ~9 GiB (> 1.25 × 6): not run.
    ran = []

    def probe(b):
        ran.append(b)
        peak = float((1 + b) * 2**30)
        return peak <= 6 * 2**30, peak, ""

    best, probes = search_max_batch(probe, 2, budget=6 * 2**30)
    assert best == 5
    assert 8 not in ran and any(p["why"].startswith("predicted") for p in probes)


def test_plot_into_a_missing_directory_fails_before_running(cli, tmp_path):
    result = cli("bench", "--precisions", "32-true", "--plot", str(tmp_path / "nope" / "b.png"))
    assert result.exit_code == 2 and "--plot: directory" in result.output


# ------------------------------------------------------------------------------------------------ benchmarks/peers.py
# The peers run itself takes minutes (three trainers, each in its own process); these check its bookkeeping.

def _peers():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "peers.py"
    spec = importlib.util.spec_from_file_location("peers_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peers_rotates_the_order_of_the_trainers():
    peers = _peers()
    abc = ["a", "b", "c"]
    assert [peers.rotation(abc, r) for r in range(4)] == [abc, ["c", "a", "b"], ["b", "c", "a"], abc]


def test_peers_hands_spladectl_the_shared_order():
    from spladectl.batches import micro_batches

    peers = _peers()
    ordered = list(range(40))  # the order every trainer must see
    arranged = peers.arrange_for_spladectl(ordered, 8, peers.SEED)
    batches = micro_batches(arranged, lambda items: items, batch_size=8, seed=peers.SEED, epoch=0)
    # the engine's collator receives (index, example) pairs (or, in older versions, the examples)
    seen = [x[1] if isinstance(x, tuple) else x for batch in batches for x in batch]
    assert seen == ordered


def test_peers_summary_and_targets():
    peers = _peers()

    def run(trainer, precision, ex_s, rss):
        return {"trainer": trainer, "precision": precision, "examples_per_s": ex_s, "peak_rss": rss * 2**30,
                "rss_training_peak": rss * 2**30, "rss_before_training": 0.4 * 2**30, "step_seconds": [1.0, 0.5],
                "losses": [1.0], "warmup": 1}

    runs = [run("spladectl", "32-true", 6, 1.0), run("spladectl", "32-true", 8, 1.0),
            run("spladectl", "bf16-mixed", 16, 1.0), run("sentence-transformers", "32-true", 2, 5.0),
            run("sentence-transformers", "bf16-mixed", 4, 1.5)]
    rows = peers.summarize(runs, ["spladectl", "sentence-transformers"], ["32-true", "bf16-mixed"])
    by = {(r["trainer"], r["precision"]): r for r in rows}
    assert by["spladectl", "32-true"]["examples_per_s"] == 7  # median of the repeats
    assert by["spladectl", "bf16-mixed"]["speedup_over_32_true"] == pytest.approx(16 / 7)
    assert by["sentence-transformers", "bf16-mixed"]["spladectl_throughput_ratio"] == 4
    assert by["sentence-transformers", "32-true"]["spladectl_memory_ratio"] == pytest.approx(0.2)
    met = {what: ok for what, _, _, ok in peers.targets(rows)}
    assert met == {"spladectl bf16-mixed / 32-true examples/s": True,  # 16 / 7 >= 2
                   "spladectl / ST examples/s, 32-true": False, "spladectl / ST examples/s, bf16-mixed": False,  # 3.5, 4
                   "spladectl / ST peak RSS, 32-true": True, "spladectl / ST peak RSS, bf16-mixed": False}  # 0.2, 0.67
    assert "| spladectl | bf16-mixed | 16.00 | 2.29× |" in peers.markdown(rows, peers.parse(["--repeats", "2"]))


def test_fp16_is_skipped_on_a_cpu_without_native_fp16_matmuls(monkeypatch):
    # Both answers of the hardware probe, whatever this CPU has: the bench must not time an emulated fp16 step
    # against a native-kernel peak (that printed "of peak 3326%" on an AVX2 CPU).
    import torch

    from spladectl import precision
    from spladectl.bench.settings import unsupported_reason

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "has_native_matmul", lambda device_type, dtype: False)
    assert "no native fp16" in unsupported_reason("16-mixed", cpu)
    assert unsupported_reason("32-true", cpu) is None
    monkeypatch.setattr(precision, "has_native_matmul", lambda device_type, dtype: True)
    assert unsupported_reason("16-mixed", cpu) is None


def test_profile_step_splits_a_step_into_phases_and_op_kinds(cli):
    rows = _rows(cli("bench", *SMALL, "--steps", "1", "--precisions", "32-true", "--in-process", "--profile-step",
                     "--json"))
    breakdown = rows[0]["step_breakdown"]
    phases = {p["phase"]: p for p in breakdown["phases"]}
    assert {"data", "encoder forward", "head forward (vocabulary projection + max)", "head backward",
            "rest of backward (encoder)", "optimizer", "loss"} <= set(phases)
    # A real step: the encoder, the head and the optimizer each took time, and the parts add up to the step.
    for name in ("encoder forward", "head forward (vocabulary projection + max)", "head backward", "optimizer"):
        assert phases[name]["ms"] > 0, name
    assert 0.9 <= sum(p["share"] for p in phases.values()) <= 1.05
    kinds = {k["kind"]: k["share"] for k in breakdown["kinds"]}
    assert kinds["matrix products"] > 0 and abs(sum(kinds.values()) - 1) < 1e-3


def test_rounds_run_the_precisions_in_turn_and_report_medians(cli):
    result = cli("bench", *SMALL, "--steps", "1", "--warmup", "0", "--precisions", "32-true,bf16-mixed", "--rounds",
                 "3", "--in-process", "--json")
    rows = {r["precision"]: r for r in _rows(result)}
    # In turn: each round runs every precision before the next round starts.
    order = [line.split(":")[0] for line in result.stderr.splitlines()
             if line.startswith(("32-true: batch", "bf16-mixed: batch", "round "))]
    ran = [p for p in ("32-true", "bf16-mixed") if rows[p]["status"] == "ok"]
    assert order == [x for r in range(1, 4) for x in [f"round {r}/3", *ran]]
    for precision in ran:
        row = rows[precision]
        assert row["rounds"] == 3 and len(row["round_step_s"]) == 3 and len(row["round_matmul_share"]) == 3
        median = sorted(row["round_step_s"])[1]
        assert row["median_step_s"] == pytest.approx(median, abs=1e-4)
        assert row["examples_per_s"] == pytest.approx(2 / median, rel=1e-3)
        assert row["matmul_share"] == pytest.approx(sorted(row["round_matmul_share"])[1], abs=1e-4)
    assert rows["32-true"]["speedup"] == 1.0
    if "bf16-mixed" in ran:
        assert rows["bf16-mixed"]["speedup"] == pytest.approx(sorted(rows["bf16-mixed"]["round_speedup"])[1],
                                                              abs=1e-3)


def _round(step_s: float, share: float = 0.5, **extra) -> dict:
    return {"status": "ok", "median_step_s": step_s, "batch_size": 4, "step_flops": 8e9, "matmul_share": share,
            "peak_memory_gb": step_s, "examples_per_s": 4 / step_s, **extra}


def test_combine_rounds_takes_the_median_of_each_rounds_ratio():
    fp32 = [_round(1.0), _round(2.0), _round(1.0)]
    # Per round bf16 is 2x, 1.25x, 2x as fast: the median ratio is 2x, while the ratio of median times is 1x.
    bf16 = [_round(0.5, 0.3, profile="first"), _round(1.6, 0.4), _round(0.5, 0.2)]
    row = combine_rounds(bf16, fp32)
    assert row["speedup"] == 2.0 and row["round_speedup"] == [2.0, 1.25, 2.0]
    assert row["median_step_s"] == 0.5 and row["examples_per_s"] == 8.0 and row["matmul_share"] == 0.3
    assert row["peak_memory_gb"] == 1.6  # the highest of any round
    assert combine_rounds(fp32, fp32)["speedup"] == 1.0
    failed = {"status": "failed", "reason": "out of memory", "precision": "bf16-mixed"}
    assert combine_rounds([bf16[0], failed, bf16[2]], fp32) == failed
    assert combine_rounds(bf16, None)["speedup"] is None
