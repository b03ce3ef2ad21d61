"""The benchmark report and its targets, from made-up figures (no Redis, no Bun)."""

from __future__ import annotations

import os

from toolq.cli import bench_report, meters
from toolq.cli.bench_report import Figures, Subject, targets


def figures(*, tool_closed: float, pss: float, rss: float, bulk: float) -> Figures:
    f = Figures()
    for name in list(f.subjects):
        rate = tool_closed if name in ("tool", "guarded") else 500.0
        f.subjects[name] = Subject(
            drain=[rate], closed=[rate], p50_ms=[2.0], p95_ms=[3.0],
            batch_p50_ms=[300.0], batch_p95_ms=[400.0], cpu_ms=[3.0],
        )  # fmt: skip
    f.peak_rss_mib, f.peak_pss_mib = [rss], [pss]
    f.bulk, f.bulk_plain, f.bulk_single = [bulk], [500.0], [300.0]
    f.sizes = {size: [[5.0, 6.0]] for size in bench_report.SIZES}
    f.baseline_sizes = {size: [[2.0, 3.0]] for size in bench_report.SIZES}
    return f


def test_memory_is_judged_by_what_the_tree_holds_not_summed_rss() -> None:
    found = targets({"warm": figures(tool_closed=400, pss=180, rss=560, bulk=1100)}, 6.0)
    memory = [t for t in found if "peak memory" in t.name]
    assert len(memory) == 1 and memory[0].met and "summed RSS 560 MiB" in memory[0].name
    over = targets({"warm": figures(tool_closed=400, pss=530, rss=560, bulk=1100)}, 6.0)
    assert not next(t for t in over if "peak memory" in t.name).met


def test_bulk_target_compares_map_with_the_plain_closed_loop() -> None:
    found = {
        t.name: t for t in targets({"warm": figures(tool_closed=400, pss=1, rss=1, bulk=990)}, 6.0)
    }
    bulk = found["map() of 2000 trivial calls (warm), throughput"]
    assert bulk.value == "1.98x plain closed loop" and not bulk.met


def test_the_report_has_the_bulk_section_and_both_memory_figures() -> None:
    results = {"warm": figures(tool_closed=400, pss=180, rss=560, bulk=1100)}
    text = bench_report.render(results, [6.0], 3, 500, 100, 15, "7", "auto", "R.png", (0, 0, 0))
    assert "## Bulk: `map()` of 2000 calls" in text and "| 2.20x |" in text
    assert "| warm | 180 | 35% | 560 |" in text


def test_pss_of_a_process_tree_is_at_most_its_rss() -> None:
    pss, rss = meters.tree_pss_mib(os.getpid()), meters.tree_rss_mib(os.getpid())
    assert 0 < pss <= rss


def test_spawn_latency_is_judged_back_to_back_and_paced_each_against_warm() -> None:
    warm = figures(tool_closed=400, pss=1, rss=1, bulk=1100)
    spawn = figures(tool_closed=60, pss=1, rss=1, bulk=0)
    warm.tool.p50_ms, warm.tool.paced_p50_ms = [2.5], [2.4]
    spawn.tool.p50_ms, spawn.tool.paced_p50_ms = [11.0], [6.0]  # 4.4x and 2.5x warm
    found = {t.name: t for t in targets({"spawn": spawn, "warm": warm}, 9.0)}
    back_to_back = found["spawn tool, p50 latency, back to back"]
    paced = found["spawn tool, p50 latency, a call every 50 ms"]
    assert (back_to_back.value, back_to_back.met) == ("4.40x warm", False)
    assert (paced.value, paced.goal, paced.met) == ("2.50x warm", "<= 1.5x", False)
    spawn.tool.paced_p50_ms = [3.5]  # 1.46x warm
    paced = {t.name: t for t in targets({"spawn": spawn, "warm": warm}, 9.0)}[paced.name]
    assert paced.met
    spawn.tool.paced_p50_ms = []  # not measured: no paced row
    assert not any("a call every" in t.name for t in targets({"spawn": spawn, "warm": warm}, 9.0))


def test_warm_against_plain_is_the_median_of_per_round_ratios() -> None:
    """Issue 26: each round's ratio (both subjects measured in it), then the median of 5,
    so one noisy round cannot decide; the spread is reported with it."""
    warm = figures(tool_closed=400, pss=1, rss=1, bulk=1100)
    warm.subjects["celery"].closed = [500.0, 500.0, 100.0, 500.0, 500.0]  # round 3: noisy
    warm.tool.closed = [420.0, 410.0, 400.0, 390.0, 380.0]
    warm.subjects["celery"].p50_ms = [2.0, 2.0, 9.0, 2.0, 2.0]
    warm.tool.p50_ms = [2.5, 2.4, 2.3, 2.7, 2.6]
    found = {t.name: t for t in targets({"warm": warm}, 9.0)}
    closed = found["warm tool (breaker off), closed-loop throughput"]
    assert (closed.value, closed.met) == ("0.82x plain (rounds 0.76-4.00)", True)
    p50 = found["warm tool (breaker off), p50 latency"]
    assert (p50.value, p50.goal, p50.met) == (
        "+0.50 ms vs plain (rounds -6.70-+0.70)",
        "<= +0.60 ms",
        True,
    )


def test_spawn_cpu_is_judged_against_the_irreducible_sandboxed_start() -> None:
    warm = figures(tool_closed=400, pss=1, rss=1, bulk=1100)
    spawn = figures(tool_closed=60, pss=1, rss=1, bulk=0)
    spawn.tool.cpu_ms, warm.tool.cpu_ms = [20.0], [3.0]
    found = {t.name: t for t in targets({"spawn": spawn, "warm": warm}, 16.0)}
    whole = found["spawn tool, worker CPU per call (Celery, toolq and the process)"]
    fresh = found["spawn tool, CPU a fresh process costs (spawn minus warm, per call)"]
    assert (whole.value, whole.met) == ("1.25x the irreducible sandboxed start", True)
    assert (fresh.value, fresh.met) == ("1.06x the irreducible sandboxed start", True)
    spawn.tool.cpu_ms = [27.0]
    again = {t.name: t for t in targets({"spawn": spawn, "warm": warm}, 16.0)}
    assert not again[whole.name].met and not again[fresh.name].met


def test_the_report_has_the_spawn_breakdown_and_says_when_a_core_was_busy() -> None:
    spawn = figures(tool_closed=60, pss=1, rss=1, bulk=0)
    spawn.tool.cpu_ms = [28.0]
    layers = {"irreducible sandboxed start": [14.0, 13.0], "+ toolq's wrapper": [17.0, 18.0]}
    text = bench_report.render(
        {"spawn": spawn}, [14.0, 13.0], 5, 500, 100, 15, "7", "auto", "R.png", (0, 0, 0),
        layers=layers, busy=True,
    )  # fmt: skip
    assert "## Spawn: where a process's CPU goes" in text
    assert "| + toolq's wrapper | 17.50 | 17.00-18.00 | +4.00 |" in text
    assert (
        "| + the worker (spawn worker CPU per call 28.00 ms) | 28.00 | 28.00-28.00 | +10.50 |"
        in text
    )
    assert "--busy-core" in text and "kept one core busy" in text
