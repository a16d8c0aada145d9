"""`badger bench runtime` / `badger bench serve` at tiny sizes: they run, report the keys the docs
use, agree across engines, and refuse sizes dense routing cannot hold (with a clear error)."""

from __future__ import annotations

import json

import pytest

from badger_runtime.bench.runtime import (
    RuntimeBench,
    bench_runtime,
    check_sizes,
    markdown_table,
    targets,
)
from badger_runtime.config import ConfigError

ROW_KEYS = {"experts", "engine", "routing", "rounds", "seconds_per_step", "expert_steps_per_s", "messages_per_s",
            "messages_per_step", "steps_timed"}


def test_runtime_bench_in_process(tiny_policy):
    spec = RuntimeBench(policy=str(tiny_policy), experts=[4, 12], steps=2, warmup=1, rounds=2, k=3,
                        candidates=5, candidates_above=8, memory=False, isolate=False)
    rep = bench_runtime(spec)
    assert rep["bench"] == "runtime" and rep["machine"]["cpus"] >= 1
    rows = {(r["experts"], r["engine"]): r for r in rep["rows"]}
    assert set(rows) == {(n, e) for n in (4, 12) for e in ("batched", "sharded", "actors")}
    for (n, engine), r in rows.items():
        assert ROW_KEYS <= r.keys(), engine
        assert r["steps_timed"] == 2 and r["expert_steps_per_s"] > 0
        for limit, frac in (("limit_expert_steps_per_s", "fraction_of_limit"),
                            ("rows_limit_expert_steps_per_s", "fraction_of_rows_limit")):
            assert r[frac] == pytest.approx(r["expert_steps_per_s"] / r[limit])  # both limits, the same run
        if engine != "batched":
            assert r["max_diff_vs_batched"] <= 1e-5  # the same rollout
    # messages: every receiver hears its in-degree per round (N, or C + 1 with candidates)
    assert rows[(4, "batched")]["messages_per_step"] == 4 * 4 * 2
    assert rows[(12, "batched")]["candidates"] == 5
    for n, deg in ((4, 4), (12, 6)):
        for e in ("batched", "sharded", "actors"):
            assert rows[(n, e)]["messages_per_step"] == n * deg * 2, (n, e)
    assert rows[(12, "sharded")]["shards"] >= 1
    table = markdown_table(rep)
    assert table.count("\n") == 1 + 6 and "| 12 | sharded |" in table


def test_runtime_bench_cli_subprocesses_memory_and_plot(tiny_policy, tmp_path, capsys):
    """The full path: a timing subprocess per N, a memory subprocess per (engine, N), JSON, figure."""
    from badger_runtime.cli import main

    png, out = tmp_path / "fig.png", tmp_path / "rep.json"
    rc = main(["bench", "runtime", "--policy", str(tiny_policy), "--experts", "6", "--steps", "1", "--rounds", "2",
               "--engines", "batched,sharded,actors", "--actor-max-n", "5", "--json", "--quiet",
               "--plot", str(png), "--out", str(out)])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text())["rows"] == rep["rows"]
    rows = {r["engine"]: r for r in rep["rows"]}
    assert "skipped" in rows["actors"]  # N = 6 > --actor-max-n 5
    for e in ("batched", "sharded"):
        r = rows[e]
        assert ROW_KEYS <= r.keys() and "error" not in r and "memory_error" not in r, r
        assert r["peak_mib"] >= 0 and r["kib_per_expert"] == pytest.approx(r["peak_mib"] * 1024 / 6)
    assert png.stat().st_size > 10_000
    rc = main(["bench", "runtime", "--from-json", str(out), "--markdown"])  # re-tabulate without running
    assert rc == 0 and "| 6 | batched |" in capsys.readouterr().out


def test_dense_routing_refuses_sizes_that_cannot_fit(capsys):
    """N^2 scores past routing.MAX_DENSE_ENTRIES: refused before anything runs, with routing's reason."""
    from badger_runtime.cli import main

    with pytest.raises(ConfigError, match=r"N = 100,000: dense routing scores every pair"):
        check_sizes(RuntimeBench(experts=[10, 100_000], routing="dense"))
    with pytest.raises(ConfigError, match="use top-k routing with candidates"):  # top-k without candidates
        check_sizes(RuntimeBench(experts=[100_000], routing="topk", candidates=0))
    check_sizes(RuntimeBench(experts=[100_000], routing="topk"))  # with candidates: O(N C), accepted
    check_sizes(RuntimeBench(experts=[10_000], routing="dense"))  # 10^8 scores fit
    rc = main(["bench", "runtime", "--routing", "dense", "--experts", "1000,100000", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "badger: error:" in err and "100,000" in err and "exceeds the limit" in err


def test_bench_refuses_bad_settings():
    with pytest.raises(ConfigError, match="unknown engine"):
        check_sizes(RuntimeBench(experts=[10], engines=["batched", "gpu"]))
    with pytest.raises(ConfigError):
        check_sizes(RuntimeBench(experts=[0]))
    with pytest.raises(ConfigError):
        check_sizes(RuntimeBench(experts=[10], steps=0))


def test_targets_are_read_off_the_rows():
    rows = [{"experts": 1000, "engine": "batched", "expert_steps_per_s": 100.0, "seconds_per_step": 10.0},
            {"experts": 1000, "engine": "sharded", "expert_steps_per_s": 60.0, "seconds_per_step": 16.7},
            {"experts": 100, "engine": "actors", "expert_steps_per_s": 1.0, "messages_per_s": 150_000.0,
             "seconds_per_step": 1.0},
            {"experts": 100_000, "engine": "sharded", "expert_steps_per_s": 1e5, "seconds_per_step": 1.0,
             "peak_mib": 5000.0}]
    t = targets(rows)
    assert t["sharded_vs_batched_at_1000"]["met"] and t["sharded_vs_batched_at_1000"]["ratio"] == 0.6
    assert t["actors_messages_per_s"]["met"]
    assert t["sharded_step_at_100000"]["met"] and not t["sharded_memory_at_100000"]["met"]


def test_serve_bench_wraps_the_load_script(tiny_policy, capsys):
    from badger_runtime.cli import main

    rc = main(["bench", "serve", "--policy", str(tiny_policy), "--experts", "4", "--clients", "2", "--steps", "3",
               "--rounds", "1", "--checkpoint-every", "0", "--quiet"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    (row,) = rep["rows"]
    assert row["experts"] == 4 and row["clients"] == 2
    assert row["steps_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]


def test_train_bench_reports_the_limit_the_fraction_and_the_gru_path():
    from badger_runtime.bench.train import bench_train
    from badger_runtime.training.kernels import kernel

    out = bench_train(experts=(3, 6), steps=(2,), batch=2, repeats=1)
    assert [r["experts"] for r in out["rows"]] == [3, 6, 20]  # the asked sizes, then the 2019 reference
    ref = out["reference"]
    assert ref["batch"] == 100 and ref["experts"] == 20 and ref["steps"] == 20
    assert out["matmul_gflops"] > 0 and ref["limit_episodes_per_s"] > 0
    assert out["fraction_of_limit"] == pytest.approx(ref["episodes_per_s"] / ref["limit_episodes_per_s"])
    assert 0 < out["cpu_fraction_of_limit"] and out["gru_kernel"] == (kernel() is not None)
    assert out["best_matmul_gflops"] >= out["matmul_gflops"]  # the fastest matmul found, torch's default or oneDNN
    assert out["fraction_of_best_limit"] == pytest.approx(out["fraction_of_limit"] * out["matmul_gflops"]
                                                          / out["best_matmul_gflops"])
    assert out["growth"]["2"]["n"] == [3, 6]


def test_the_policy_call_limit_over_distinct_rows_calls_every_row_once(tiny_policy):
    """``policy_rates(distinct=True)`` makes the same calls over distinct rows (cycling past
    DISTINCT_ROWS_MAX); ``distinct=False`` calls one hot chunk."""
    from badger_runtime.bench import runtime
    from badger_runtime.policy_card import load_policy

    pol = load_policy(tiny_policy)
    seen = []
    real = pol.step
    pol.step = lambda h, i, s: seen.append(h.copy()) or real(h, i, s)
    runtime.policy_rates(pol, 40, chunk=8, repeats=1, distinct=True)
    assert len(seen) == 5 and len({x.tobytes() for x in seen}) == 5
    seen.clear()
    runtime.policy_rates(pol, 40, chunk=8, repeats=1)
    assert len(seen) == 5 and len({x.tobytes() for x in seen}) == 1
