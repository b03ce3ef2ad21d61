"""What bounding a result's depth before parsing costs (issue 29, item 1).

    .venv/bin/python bench/investigations/depth_check_cost.py

The worker reads every result envelope's nesting from its text
(toolq.validation.text_nests_deeper) before json.loads; prints the best of five runs
for a few 10 MB shapes, and json.loads of the same text for scale."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from toolq.validation import text_nests_deeper


def best_ms(action: Callable[[], object], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def chains(levels: int, size: int = 10_000_000) -> bytes:
    one = b"[" * levels + b"]" * levels
    return b"[" + b",".join([one] * (size // (len(one) + 1))) + b"]"


def main() -> None:
    shapes = {
        "200k small objects": json.dumps(
            [{"id": i, "name": f'item "{i}" [x]', "tags": ["a", "b"]} for i in range(200_000)]
        ).encode(),
        "chains 20 deep": chains(20),
        "chains 100 deep (at the bound)": chains(100),
        "a 5,000-level bomb": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    }
    for name, text in shapes.items():
        check = best_ms(lambda text=text: text_nests_deeper(text))
        try:
            parse = f"{best_ms(lambda text=text: json.loads(text)):7.1f} ms"
        except RecursionError:
            parse = "RecursionError"
        print(
            f"{name:32} {len(text) / 1e6:5.1f} MB  depth check {check:7.1f} ms  json.loads {parse}"
        )


if __name__ == "__main__":
    main()
