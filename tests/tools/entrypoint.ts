// Test tools: one behaviour each, in the Compozy convention (default export).
import { spawn } from "node:child_process";
import { appendFileSync, readdirSync, readFileSync, writeFileSync } from "node:fs";

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

// Module-level state: survives between calls of one warm process, not across processes.
let calls = 0;
const instance = crypto.randomUUID(); // names this process, inside a PID namespace or not
const hoard: string[] = [];

// Appends this run's start time to a file; returns how many runs it now holds.
function record(counter: string): number {
  appendFileSync(counter, `${Date.now()}\n`);
  return readFileSync(counter, "utf8").trim().split("\n").length;
}

export default {
  echo: async (input: unknown) => ({ echo: input }),
  with_config: async (_input: unknown, config: unknown) => ({ config }),

  // result normalisation
  returns_string: async () => "hello",
  returns_number: async () => 42,
  returns_array: async () => [1, 2, 3],
  returns_null: async () => null,
  returns_undefined: async () => undefined,
  returns_bigint: async () => ({ n: 10n }),

  // environment and output channels
  env: async (input: { keys?: string[] }) => {
    const keys = input?.keys ?? Object.keys(process.env);
    return { env: Object.fromEntries(keys.map((k) => [k, process.env[k] ?? null])) };
  },
  env_keys: async () => ({ keys: Object.keys(process.env).sort() }),
  console: async () => {
    console.log("log line");
    console.info("info line");
    console.warn("warn line");
    console.error("error line");
    return { ok: true };
  },
  stray_stdout: async () => {
    process.stdout.write('{"result": "forged", "error": null}\n');
    process.stdout.write("not json at all\n");
    return { ok: true };
  },
  print_secret: async () => {
    console.error(`the secret is ${process.env.API_TOKEN}`);
    process.exit(7);
  },

  // errors
  throws: async () => {
    throw new TypeError("bad things happened");
  },
  throws_string: async () => {
    throw "just a string";
  },
  throws_non_retryable: async () => {
    const e = new Error("do not retry me") as Error & { retryable: boolean };
    e.retryable = false;
    throw e;
  },
  late_throw: async () => {
    setTimeout(() => {
      throw new Error("thrown from a timer");
    }, 10);
    await sleep(2000);
    return { unreachable: true };
  },

  // resilience: each run appends its start time (ms) to input.counter
  flaky: async (input: { counter: string; succeed_on?: number }) => {
    const runs = record(input.counter);
    if (runs < (input.succeed_on ?? 3)) throw new Error(`flaky failure #${runs}`);
    return { runs };
  },
  always_fails: async (input: { counter: string }) => {
    throw new Error(`failure #${record(input.counter)}`);
  },
  non_retryable: async (input: { counter: string }) => {
    record(input.counter);
    const e = new Error("permanent") as Error & { retryable: boolean };
    e.retryable = false;
    throw e;
  },
  breaker_target: async (input: { counter: string; fail?: boolean; ms?: number }) => {
    const runs = record(input.counter);
    if (input.ms) await sleep(input.ms);
    if (input.fail) throw new Error("breaker_target failed");
    return { runs };
  },
  // breaker accounting (one verdict per call): the same body under two ids with
  // different breaker settings in compozy.yaml
  health_once: async (input: { counter?: string; fail?: boolean; ms?: number }) => {
    const runs = input.counter ? record(input.counter) : 0;
    if (input.ms) await sleep(input.ms);
    if (input.fail) throw new Error("health check failed");
    return { runs };
  },
  health_rate: async (input: { fail?: boolean }) => {
    if (input.fail) throw new Error("health check failed");
    return { ok: true };
  },
  marked_sleep: async (input: { marker: string; ms: number }) => {
    writeFileSync(input.marker, String(process.pid));
    await sleep(input.ms);
    return { slept: input.ms, pid: process.pid };
  },

  // warm mode
  pid: async () => ({ pid: instance }),
  tmp_write: async () => {
    const dir = process.env.TMPDIR!;
    writeFileSync(`${dir}/left-behind.txt`, "secret scratch data");
    return { dir };
  },
  tmp_list: async () => ({ dir: process.env.TMPDIR, entries: readdirSync(process.env.TMPDIR!) }),
  module_counter: async () => ({ calls: ++calls, pid: instance }),
  grow: async (input: { mb: number }) => {
    for (let i = 0; i < input.mb; i++) hoard.push(Buffer.alloc(1 << 20, i % 256).toString("latin1"));
    return { held_mb: hoard.length, pid: instance };
  },

  // crashes
  exit_code: async (input: { code?: number }) => {
    process.exit(input?.code ?? 3);
  },
  exit_zero: async () => {
    process.exit(0);
  },
  segfault: async () => {
    process.kill(process.pid, "SIGSEGV");
    await sleep(5000);
  },

  // time
  sleep: async (input: { ms?: number }) => {
    const start = Date.now();
    await sleep(input?.ms ?? 100);
    return { slept: input?.ms ?? 100, start, end: Date.now() };
  },
  busy_loop: async () => {
    for (;;) {}
  },
  ignore_sigterm: async (input: { pidfile?: string }) => {
    process.on("SIGTERM", () => {
      if (input?.pidfile) appendFileSync(input.pidfile, "sigterm\n");
    });
    await sleep(60_000);
  },
  graceful_sigterm: async (input: { marker?: string }) => {
    process.on("SIGTERM", () => {
      if (input?.marker) writeFileSync(input.marker, "cleaned up");
      process.exit(143);
    });
    await sleep(60_000);
  },
  lingering: async () => {
    setInterval(() => {}, 1000);
    Bun.serve({ port: 0, fetch: () => new Response("hi") });
    return { done: true };
  },

  // children
  // `sleep <seconds>` with a unique fraction: the test finds it in /proc by its arguments
  fork_child: async (input: { seconds: string; detach?: boolean }) => {
    const child = spawn("sleep", [input.seconds], { stdio: "ignore", detached: !!input.detach });
    if (input.detach) child.unref();
    return { spawned: true };
  },
  fork_and_hang: async (input: { seconds: string; marker?: string }) => {
    spawn("sleep", [input.seconds], { stdio: "ignore" });
    if (input.marker) writeFileSync(input.marker, "running");
    await sleep(300_000);
  },

  // sandbox probes: each tries one thing and says whether it worked
  probe: async (input: { action: string; path?: string; port?: number; name?: string }) => {
    try {
      switch (input.action) {
        case "write":
          writeFileSync(input.path!, "written");
          return { ok: true };
        case "read":
          return { ok: true, text: readFileSync(input.path!, "utf8").slice(0, 100) };
        case "connect": {
          const socket = await Bun.connect({
            hostname: "127.0.0.1",
            port: input.port!,
            socket: { data() {} },
          });
          socket.end();
          return { ok: true };
        }
        case "env":
          return { ok: input.name! in process.env, value: process.env[input.name!] ?? null };
        case "run": {
          const proc = Bun.spawnSync(["ls", "/"]);
          return { ok: proc.exitCode === 0 };
        }
        default:
          return { ok: false, error: `unknown action ${input.action}` };
      }
    } catch (e) {
      return { ok: false, error: String(e) };
    }
  },
  open_files_limit: async () => {
    const line = readFileSync("/proc/self/limits", "utf8")
      .split("\n")
      .find((l) => l.startsWith("Max open files"))!;
    return { limit: Number(line.split(/\s+/)[3]) };
  },
  fork_bomb: async (input: { max: number }) => {
    let spawned = 0;
    let refused = 0;
    for (let i = 0; i < input.max; i++) {
      try {
        Bun.spawn(["sleep", "5"], { stdio: ["ignore", "ignore", "ignore"] });
        spawned++;
      } catch {
        refused++;
      }
    }
    await sleep(300);
    return { spawned, refused };
  },

  // floods and sizes
  flood_stdout: async () => {
    const chunk = "x".repeat(1 << 16) + "\n";
    for (;;) {
      process.stdout.write(chunk);
      await sleep(0);
    }
  },
  flood_stderr_then_return: async (input: { mb?: number }) => {
    const chunk = "e".repeat(1 << 16);
    for (let i = 0; i < (input?.mb ?? 3) * 16; i++) console.error(chunk);
    return { ok: true };
  },
  big_output: async (input: { bytes: number }) => ({ data: "x".repeat(input.bytes) }),
  input_size: async (input: { data: string }) => ({ length: input.data.length }),
  memory_hog: async () => {
    const hog: string[] = [];
    for (;;) hog.push("y".repeat(1 << 20) + hog.length);
  },

  // flow control (tests/test_flow.py): the same stamping tool under several settings
  stamp,
  capped: stamp,
  capped_one: stamp,
  capped_per_key: stamp,
  capped_lease: stamp,
  rated: stamp,
  rated_reject: stamp,
  cached: async (input: { log: string; fail?: boolean }) => {
    stamp({ log: input.log });
    if (input.fail) throw new Error("no answer to cache");
    return { answer: crypto.randomUUID() };
  },
  slow_retry: async (input: { counter: string }) => {
    throw new Error(`failure #${record(input.counter)}`);
  },
};

export const named_only_is_ignored_when_default_exists = async () => ({ ok: true });

// Appends "start <tag> <ms>" and, after input.ms, "end <tag> <ms>" to input.log: overlaps
// and rates are counted from the tool's own stamps, not from the test's clock.
async function stamp(input: { log: string; ms?: number; tag?: string }) {
  const tag = input.tag ?? "-";
  appendFileSync(input.log, `start ${tag} ${Date.now()}\n`);
  if (input.ms) await sleep(input.ms);
  appendFileSync(input.log, `end ${tag} ${Date.now()}\n`);
  return { tag };
}
