"""The profile's layer attribution (toolq bench): pure functions over stacks."""

from __future__ import annotations

import cProfile
import json
import pstats
import sysconfig
from pathlib import Path

import toolq.workers.runtime
from toolq.cli.profile_call import LAYERS, layer_of_stack, layers_of_profile, layers_of_samples

STDLIB = sysconfig.get_paths()["stdlib"]
PUMP = str(Path(toolq.workers.runtime.__file__).parent / "pump.py")
HANDLER = str(Path(toolq.workers.runtime.__file__).parents[1] / "handler.py")
SITE = "/venv/lib/python3.11/site-packages"


def frame(function: str, path: str, line: int = 1) -> str:
    return f"{function} ({path}:{line})"


def test_a_stdlib_leaf_counts_for_its_caller() -> None:
    under_redis = [
        frame("run", f"{SITE}/celery/worker.py"),
        frame("execute_command", f"{SITE}/redis/client.py"),
        frame("sendall", f"{STDLIB}/socket.py"),
    ]
    assert layer_of_stack(under_redis) == "redis-py, for Celery"
    toolq_redis = [frame("admit", HANDLER), *under_redis[1:]]
    assert layer_of_stack(toolq_redis) == "redis-py, for toolq"
    under_pump = [
        frame("handle", HANDLER),
        frame("collect", PUMP),
        frame("select", f"{STDLIB}/selectors.py"),
    ]
    assert layer_of_stack(under_pump) == "toolq runtime (Bun pipes)"


def test_json_is_its_own_layer_wherever_it_is_called() -> None:
    stack = [frame("handle", HANDLER), frame("dumps", f"{STDLIB}/json/__init__.py")]
    assert layer_of_stack(stack) == "JSON"
    assert layer_of_stack([frame("dumps", f"{SITE}/kombu/utils/json.py")]) == "JSON"


def test_toolq_handler_and_celery_and_unknown_code() -> None:
    assert layer_of_stack([frame("handle", HANDLER)]) == "toolq handler"
    assert layer_of_stack([frame("on_message", f"{SITE}/kombu/messaging.py")]) == "Celery/kombu"
    assert layer_of_stack([frame("run", f"{STDLIB}/threading.py")]) == "other Python"


def test_py_spy_raw_lines_are_counted_by_layer() -> None:
    raw = "\n".join(
        [
            ";".join([frame("a", f"{SITE}/celery/app.py"), frame("b", f"{SITE}/redis/client.py")])
            + " 3",
            frame("handle", HANDLER) + " 2",
            "",
        ]
    )
    counts = layers_of_samples(raw)
    assert counts == {"redis-py, for Celery": 3, "toolq handler": 2}
    assert set(counts) <= set(LAYERS)


def test_cprofile_time_is_split_by_layer() -> None:
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [json.dumps({"n": list(range(200))}) for _ in range(200)])
    seconds = layers_of_profile(pstats.Stats(profiler))
    assert seconds["JSON"] > 0
    assert set(seconds) <= set(LAYERS)
