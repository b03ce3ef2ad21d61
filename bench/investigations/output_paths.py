"""Which way out of Bun is fastest for the envelope? (the core issue asks to measure)

Runs tiny Bun scripts that read a request on stdin and write a 1 KiB envelope
by different routes, many times each, interleaved, and prints the median wall
time and CPU per call, each as a ratio to a bare `bun -e ''` start measured in
the same run.

    .venv/bin/python bench/investigations/output_paths.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from toolq.workers.runtime.bun import find_bun

READ_STDIN = 'const req = JSON.parse(require("node:fs").readFileSync(0, "utf8"));\n'
BODY = 'const body = JSON.stringify({result: {data: "x".repeat(1024)}, error: null}) + "\\n";\n'
VARIANTS = {
    "bare bun start (baseline)": "",
    "Bun.stdin + Bun.write(fd)  [toolq]": "const req = JSON.parse(await Bun.stdin.text());\n"
    + BODY
    + "await Bun.write(Bun.file(Number(process.argv[2])), body); process.exit(0);\n",
    "node:fs read + writeSync(fd)": READ_STDIN
    + BODY
    + 'require("node:fs").writeSync(Number(process.argv[2]), body); process.exit(0);\n',
    "process.stdout.write": READ_STDIN + BODY + "process.stdout.write(body);\n",
    "console.log": READ_STDIN + BODY + "console.log(body);\n",
    "await Bun.write(Bun.stdout)": READ_STDIN + BODY + "await Bun.write(Bun.stdout, body);\n",
}


def one_call(bun: Path, script: Path) -> tuple[float, float]:
    read_fd, write_fd = os.pipe()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(bun), "--smol", "--no-install", "--no-env-file", str(script), str(write_fd)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=(write_fd,),
    )
    os.close(write_fd)
    proc.communicate(b'{"tool_id":"x","input":{}}')
    while os.read(read_fd, 65536):
        pass
    os.close(read_fd)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    bun = find_bun(None, Path.cwd())
    with tempfile.TemporaryDirectory() as tmp:
        scripts = {}
        for i, (name, source) in enumerate(VARIANTS.items()):
            scripts[name] = Path(tmp) / f"v{i}.ts"
            scripts[name].write_text(source)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, script in scripts.items():
                samples[name].append(one_call(bun, script))
    base_wall = statistics.median(w for w, _ in samples["bare bun start (baseline)"])
    base_cpu = statistics.median(c for _, c in samples["bare bun start (baseline)"])
    print(f"Bun {subprocess.run([str(bun), '--version'], capture_output=True, text=True).stdout}")
    print(f"{'route':34} {'wall ms':>8} {'x base':>7} {'cpu ms':>8} {'x base':>7}")
    for name, values in samples.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        print(
            f"{name:34} {wall * 1000:8.2f} {wall / base_wall:7.2f} "
            f"{cpu * 1000:8.2f} {cpu / base_cpu:7.2f}"
        )


if __name__ == "__main__":
    main()
