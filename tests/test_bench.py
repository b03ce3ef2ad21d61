"""The benchmark's baseline is a real, plain Celery worker (``toolq bench``)."""

from __future__ import annotations

from toolq.cli import bench_baseline
from toolq.cli.bench import baseline_worker
from toolq.cli.meters import CpuMeter


def test_the_plain_celery_baseline_runs_its_no_op_on_its_own_worker(redis_url: str) -> None:
    with baseline_worker(redis_url, concurrency=2) as (app, worker):
        assert worker.argv[1:5] == ["-m", "celery", "-A", "toolq.cli.bench_baseline"]
        assert "toolq" not in " ".join(worker.argv[5:])  # none of toolq's settings
        assert app.conf.task_acks_late and app.conf.worker_prefetch_multiplier == 1
        before = worker.cpu.seconds()
        results = [
            app.send_task(bench_baseline.NOOP, args=[None], queue=worker.queue) for _ in range(20)
        ]
        assert [result.get(timeout=30) for result in results] == [None] * 20
        assert worker.cpu.seconds() > before


def test_cpu_meter_counts_a_process_it_is_given() -> None:
    import os

    meter = CpuMeter(os.getpid())
    start = meter.seconds()
    sum(i * i for i in range(2_000_000))
    assert meter.seconds() > start
    if meter.group is not None:  # put this test process back before the cgroup goes
        (meter.group.parent / "cgroup.procs").write_text(str(os.getpid()))
        meter.close()
