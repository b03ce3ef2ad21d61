"""What signing calls costs (docs/security/signing.md).

Two measurements, each against the same thing unsigned, in the same run:

1. the signature alone: the producer's ``Signer.headers`` plus the worker's
   ``Signer.check`` over a call's message (a small input, and a 100 KiB one), in µs per
   call, next to what the message costs anyway without a key: ``to_message``, Celery's
   JSON encoding of it, the worker's JSON decoding and ``from_message``;
2. end to end: sequential calls of a trivial tool (``echo``, empty env, so nothing is
   sealed) through Redis and a real worker in warm mode, one worker and producer with a
   key (every call signed and checked) and one without, interleaved (median ms per call).

Needs a Redis (TOOLQ_REDIS_URL, else a private one).

    .venv/bin/python bench/investigations/signing_cost.py [--calls 300] [--rounds 20000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from toolq.cli.bench import bench_worker
from toolq.cli.devredis import ensure_redis, scratch_database
from toolq.config.celery_app import RUN_TOOL_TASK
from toolq.protocol import CallRequest, new_request
from toolq.signing import Signer

TOOLS = Path(__file__).resolve().parents[2] / "tests" / "tools"
INPUTS: dict[str, Any] = {
    "small input": {"city": "Oslo", "units": "metric"},
    "100 KiB input": {"text": "x" * (100 * 1024)},
}


def best_us(work: Any, rounds: int) -> float:
    """µs per call of ``work()``, best of five batches (the least disturbed by other work)."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds // 5):
            work()
        best = min(best, (time.perf_counter() - started) / (rounds // 5) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    key = Fernet.generate_key().decode()
    signer = Signer(key, "bench")

    print("per call, producer sign + worker check, against the message's own codec:")
    for label, tool_input in INPUTS.items():
        message = new_request("echo", tool_input).to_message()
        rounds = args.rounds if len(str(tool_input)) < 1000 else max(args.rounds // 50, 50)

        def codec(message: Any = message) -> None:
            sent = json.dumps(new_request("echo", message["input"]).to_message())
            CallRequest.from_message(json.loads(sent))

        def signed(message: Any = message) -> None:
            headers = signer.headers(RUN_TOOL_TASK, "call-id", "queue", message)
            assert signer.check(RUN_TOOL_TASK, "call-id", "queue", message, headers) is None

        codec_us, sign_us = best_us(codec, rounds), best_us(signed, rounds)
        print(
            f"  {label:14} sign+check {sign_us:8.1f} µs   codec {codec_us:8.1f} µs   "
            f"ratio {sign_us / codec_us:.2f}x"
        )

    with (
        ensure_redis() as base_url,
        scratch_database(base_url, "bench") as redis_url,
        contextlib.ExitStack() as stack,
    ):
        clients = {
            name: stack.enter_context(
                bench_worker(TOOLS / "compozy.yaml", redis_url, f"sign-{label}", env, concurrency=1)
            )[0]
            for name, label, env in (
                ("unsigned", "plain", {}),
                ("signed", "signed", {"TOOLQ_SECRET_KEY": key}),
            )
        }
        times: dict[str, list[float]] = {name: [] for name in clients}
        for round_ in range(args.calls + 20):
            for name, client in clients.items():
                started = time.perf_counter()
                result = client.run("echo", INPUTS["small input"], wait=30)
                assert result.ok, result.error
                if round_ >= 20:  # the first calls warm up connections and Bun
                    times[name].append((time.perf_counter() - started) * 1000)
    plain_ms, signed_ms = (statistics.median(times[name]) for name in ("unsigned", "signed"))
    print(f"end to end (warm worker, sequential, median of {args.calls}):")
    print(
        f"  unsigned {plain_ms:8.2f} ms   signed {signed_ms:8.2f} ms   "
        f"ratio {signed_ms / plain_ms:.2f}x"
    )


if __name__ == "__main__":
    main()
