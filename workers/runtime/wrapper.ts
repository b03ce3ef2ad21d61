// toolq's Bun wrapper: runs Compozy-style tool calls.
//
//   bun wrapper.ts <entrypoint> <envelope-fd> spawn [options]   one call, then exit
//   bun wrapper.ts <entrypoint> <envelope-fd> warm [options]    one call per stdin line
//   bun wrapper.ts <entrypoint> <envelope-fd> check [options]   start-up check: load, list
//                                                               tools, exit
//
// Options (set up before the tool's module loads, so its top-level code is bound too):
//   --toolq-no-exec=<nr>:<hex>  install this seccomp filter (execve/execveat -> EPERM) on
//                               every thread: no --allow-run. bwrap cannot: its filter
//                               applies before it executes Bun itself.
//   --toolq-no-ffi              no --allow-ffi: load no_ffi.ts (bun:ffi, Bun.FFI,
//                               process.dlopen throw, also in Workers).
//   --toolq-egress=<socket>     --allow-net: relay 127.0.0.1:<port> to the egress proxy's
//                               unix socket and point HTTP(S)_PROXY at it (netshim.so,
//                               when preloaded, takes raw TCP connections to the socket).
//
// The call's env arrives in the request (never in the environment bwrap and the
// loader see) and is set here, just before the tool runs: in both modes the
// entrypoint is loaded before the call is known (spawn mode starts processes ahead of
// demand), so its module-level code sees only the base environment.
//
// A request is one JSON object (one line in warm mode):
//   {tool_id, tool_exec_id, input, config, env, timeout_ms, nonce}
// Each call ends with exactly one envelope, `<nonce>{result, error, metadata}\n`, on
// the envelope fd — a pipe of its own, so a tool's stray stdout cannot corrupt it.
// console.* goes to stderr with a level prefix, as in Compozy.
//
// I/O uses Bun's own APIs only: the first use of node:fs (readFileSync,
// writeSync) costs ~4 ms per process, process.stdout.write ~14 ms
// (bench/investigations/output_paths.py measures each route).
//
// Over 400 lines on purpose: this file is on every spawned process's start path, where
// each module more is a file more to read and transpile; what only a grant needs
// (no_ffi.ts) is a module of its own, loaded only then.

const MAX_OUTPUT_BYTES = 10 * 1024 * 1024;
const entrypoint = process.argv[2];
const envelope = Bun.file(Number(process.argv[3]));
let out = envelope; // where send() writes: the envelope, or /dev/null for a rehearsal
const warm = process.argv[4] === "warm";
const check = process.argv[4] === "check";
const options = new Map(
  process.argv.slice(5).map((arg) => {
    const at = arg.indexOf("=");
    return at < 0 ? [arg, ""] : [arg.slice(0, at), arg.slice(at + 1)];
  }),
);

// bun:ffi is loaded only when a filter must be installed, and only by this file.
function denyExec(spec: string): void {
  const [nr, hex] = spec.split(":");
  const { dlopen, ptr } = require("bun:ffi");
  const symbols = { syscall: { args: ["i64", "i64", "i64", "ptr"], returns: "i64" } } as const;
  const names = ["libc.so.6", `libc.musl-${process.arch === "arm64" ? "aarch64" : "x86_64"}.so.1`];
  let libc: { symbols: { syscall(...args: unknown[]): bigint }; close(): void } | undefined;
  for (const name of names) {
    try {
      libc = dlopen(name, symbols); // glibc, then musl: already loaded, found by soname
      break;
    } catch {}
  }
  if (!libc) throw new Error(`toolq: cannot find libc (${names.join(", ")}) to deny exec`);
  const program = Buffer.from(hex, "hex");
  const fprog = new BigUint64Array([BigInt(program.length / 8), BigInt(ptr(program))]);
  // seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fprog): all threads
  const status = libc.symbols.syscall(Number(nr), 1, 1, ptr(fprog));
  libc.close();
  if (status !== 0n) throw new Error(`toolq: cannot install the no-exec seccomp filter (${status})`);
}

// --allow-net: the sandbox has only its loopback; fetch goes through the worker's
// egress proxy, which decides what a tool may reach. Each side queues what its socket did not
// take yet and sends it on `drain`, so large bodies pass whole.
type Writable = { write(data: Uint8Array): number; end(): void };
type Side = { socket?: Writable; queued: Uint8Array[]; ending: boolean };

function forward(side: Side, chunk?: Uint8Array): void {
  if (chunk) side.queued.push(new Uint8Array(chunk)); // a copy: the buffer is reused
  if (!side.socket) return;
  while (side.queued.length) {
    const head = side.queued[0];
    const written = side.socket.write(head);
    if (written < head.length) {
      side.queued[0] = head.subarray(Math.max(written, 0));
      return; // the rest goes on drain
    }
    side.queued.shift();
  }
  if (side.ending) side.socket.end();
}

function finish(side: Side): void {
  side.ending = true;
  forward(side);
}

function relayEgress(socketPath: string): void {
  type Pair = { toUpstream: Side; toClient: Side };
  const server = Bun.listen<Pair>({
    hostname: "127.0.0.1",
    port: 0,
    socket: {
      open(client) {
        const pair: Pair = {
          toUpstream: { queued: [], ending: false },
          toClient: { socket: client, queued: [], ending: false },
        };
        client.data = pair;
        Bun.connect({
          unix: socketPath,
          socket: {
            open(upstream) {
              pair.toUpstream.socket = upstream;
              forward(pair.toUpstream);
            },
            data(_upstream, chunk) {
              forward(pair.toClient, chunk);
            },
            drain() {
              forward(pair.toUpstream);
            },
            end() {
              finish(pair.toClient);
            },
            close() {
              finish(pair.toClient);
            },
            error() {
              finish(pair.toClient);
            },
          },
        }).catch(() => client.end());
      },
      data(client, chunk) {
        forward(client.data.toUpstream, chunk);
      },
      drain(client) {
        forward(client.data.toClient);
      },
      end(client) {
        finish(client.data.toUpstream);
      },
      close(client) {
        finish(client.data.toUpstream);
      },
    },
  });
  const url = `http://127.0.0.1:${server.port}`;
  for (const name of ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]) process.env[name] = url;
  resolveThroughShim();
}

// Bun.connect resolves names with c-ares, which has no route here; netshim.c answers
// the system resolver (getaddrinfo) with a placeholder address it turns back into the
// name for the proxy. So a name goes through the system resolver first (TLS keeps the
// name for SNI and the certificate). A route, not a guard: the proxy decides.
function resolveThroughShim(): void {
  const connect = Bun.connect;
  type Options = Parameters<typeof connect>[0] & { hostname?: string; tls?: unknown };
  Bun.connect = ((options: Options) => {
    const host = options?.hostname;
    if (typeof host !== "string" || "unix" in options || require("node:net").isIP(host)) {
      return connect(options);
    }
    return Bun.dns.lookup(host, { backend: "system" }).then((found) => {
      const tls = options.tls === true ? {} : options.tls;
      const resolved = { ...options, hostname: found[0].address } as Options;
      if (tls && typeof tls === "object") resolved.tls = { serverName: host, ...tls };
      return connect(resolved);
    });
  }) as typeof connect;
}

if (options.has("--toolq-no-exec")) denyExec(options.get("--toolq-no-exec")!);
if (options.has("--toolq-no-ffi")) require(`${import.meta.dir}/no_ffi.ts`);
if (options.has("--toolq-egress")) relayEgress(options.get("--toolq-egress")!);

type ErrorInfo = {
  kind: string;
  name: string;
  message: string;
  stack?: string | null;
  retryable?: boolean;
};

type Request = {
  tool_id?: unknown;
  tool_exec_id?: unknown;
  input?: unknown;
  config?: unknown;
  env?: Record<string, string>;
  nonce?: unknown;
};

// The call in progress: late errors (a throwing timer, an unawaited rejection) are its.
let active: { nonce: string; toolId: string; toolExecId: string; started: number; sent: boolean } | null =
  null;

const toStderr = console.error.bind(console);
for (const level of ["log", "info", "warn", "error", "debug", "trace"] as const) {
  const prefix = `[${level.toUpperCase()}]`;
  console[level] = (...args: unknown[]) => toStderr(prefix, ...args);
}

async function send(result: unknown, error: ErrorInfo | null, exiting = false): Promise<void> {
  const call = active;
  if (!call || call.sent) return;
  call.sent = true;
  const metadata: Record<string, unknown> = {
    tool_id: call.toolId,
    tool_exec_id: call.toolExecId,
    execution_time: Math.round(performance.now() - call.started),
  };
  if (exiting) metadata.exiting = true; // warm mode: do not send this process another call
  let body: string;
  try {
    body = JSON.stringify({ result: result ?? null, error, metadata });
  } catch (e) {
    body = JSON.stringify({
      result: null,
      error: describe(e, "invalid_output", `tool result is not JSON-serialisable: ${String(e)}`),
      metadata,
    });
  }
  if (body.length > MAX_OUTPUT_BYTES || Buffer.byteLength(body) > MAX_OUTPUT_BYTES) {
    body = JSON.stringify({
      result: null,
      error: {
        kind: "output_too_large",
        name: "OutputTooLarge",
        message: `tool output exceeds maximum size limit of ${MAX_OUTPUT_BYTES} bytes`,
      },
      metadata,
    });
  }
  await Bun.write(out, `${call.nonce}${body}\n`);
}

// no_ffi.ts records its refusal: a package may wrap it in an error of its own.
const NATIVE_REFUSED = Symbol.for("toolq.nativeRefused");
function withRefusal(message: string): string {
  const refused = (globalThis as Record<symbol, unknown>)[NATIVE_REFUSED];
  if (typeof refused !== "string" || message.includes(refused)) return message;
  return `${message} (${refused}: a module tried to load native code)`;
}

function describe(e: unknown, kind: string, message?: string): ErrorInfo {
  const err = e instanceof Error ? e : null;
  const info: ErrorInfo = {
    kind,
    name: err?.name ?? "Error",
    message: message ?? withRefusal(err ? err.message : String(e)),
    stack: err?.stack ?? null,
  };
  const retryable = (e as { retryable?: unknown } | null)?.retryable;
  if (typeof retryable === "boolean") info.retryable = retryable;
  return info;
}

// A failure outside the tool's own promise is still the call's error. In warm mode
// the process may hold state the failure left broken, so it exits and is replaced.
async function onLateError(e: unknown): Promise<void> {
  if (check) toStderr(`the entrypoint failed while loading: ${e instanceof Error ? e.stack ?? e.message : String(e)}`);
  await send(null, describe(e, "tool_error"), true);
  process.exit(1);
}
process.on("uncaughtException", onLateError);
process.on("unhandledRejection", onLateError);

let loading: Promise<Record<string, unknown> | Error> | null = null;

function load(): Promise<Record<string, unknown> | Error> {
  loading ??= import(entrypoint).then(
    (module) => {
      const exported = module.default;
      return (exported && typeof exported === "object" ? exported : module) as Record<string, unknown>;
    },
    (e) => new Error(withRefusal(`failed to load entrypoint ${entrypoint}: ${loadProblem(e)}`)),
  );
  return loading;
}

// Bun reports build errors (syntax, resolution) as an AggregateError of messages with positions.
function loadProblem(e: unknown): string {
  const errors = (e as { errors?: unknown[] } | null)?.errors;
  if (!Array.isArray(errors) || errors.length === 0) return String(e);
  return errors
    .map((m) => {
      const p = (m as { position?: { file?: string; line?: number; column?: number } }).position;
      const where = p ? ` (${p.file}:${p.line}:${p.column})` : "";
      return `${(m as { message?: string }).message ?? String(m)}${where}`;
    })
    .join("; ");
}
if (warm) load(); // warm: loaded once, ahead of the first call

const baseEnv = { ...process.env };

// Warm mode: timers a call leaves pending are cleared when it ends, and a Bun.sleep it
// started never resolves after that, so nothing the call scheduled runs during a later
// call and reads that caller's env. (Pending I/O callbacks cannot be cancelled: see the
// docs/runtime-modes.md, "What survives"; isolation: strict gives such tools a process per call.)
let callRunning = false;
let callNumber = 0;
const callTimers = new Map<unknown, (handle: unknown) => void>();
if (warm) {
  const g = globalThis as unknown as Record<string, (...args: unknown[]) => unknown>;
  for (const [set, clear, once] of [
    ["setTimeout", "clearTimeout", true],
    ["setInterval", "clearInterval", false],
    ["setImmediate", "clearImmediate", true],
  ] as const) {
    const original = g[set];
    const originalClear = g[clear];
    g[set] = (callback: unknown, ...rest: unknown[]) => {
      if (!callRunning || typeof callback !== "function") return original(callback, ...rest);
      const run = (...args: unknown[]) => {
        if (once) callTimers.delete(handle);
        return callback(...args);
      };
      const handle = original(run, ...rest);
      callTimers.set(handle, originalClear);
      return handle;
    };
    g[clear] = (handle: unknown) => {
      callTimers.delete(handle);
      return originalClear(handle);
    };
  }
  const sleep = Bun.sleep;
  (Bun as unknown as { sleep: typeof sleep }).sleep = (ms) => {
    const started = callNumber;
    const pending = sleep(ms);
    return callRunning ? pending.then(() => (started === callNumber ? undefined : new Promise<void>(() => {}))) : pending;
  };
}

function endCall(): void {
  if (!callRunning) return;
  callRunning = false;
  callNumber++;
  for (const [handle, clear] of callTimers) clear(handle);
  callTimers.clear();
}

function applyEnv(env: Record<string, string> | undefined): void {
  for (const [key, value] of Object.entries(env ?? {})) process.env[key] = value;
}

function restoreEnv(): void {
  for (const key of Object.keys(process.env)) {
    if (!(key in baseEnv)) delete process.env[key];
  }
  for (const [key, value] of Object.entries(baseEnv)) process.env[key] = value;
}

async function handle(line: string): Promise<void> {
  let request: Request;
  try {
    request = JSON.parse(line);
  } catch (e) {
    active = { nonce: "", toolId: "", toolExecId: "", started: performance.now(), sent: false };
    return send(null, { kind: "invalid_input", name: "ParseError", message: `invalid request: ${e}` });
  }
  const toolId = String(request.tool_id ?? "");
  active = {
    nonce: String(request.nonce ?? ""),
    toolId,
    toolExecId: String(request.tool_exec_id ?? ""),
    started: performance.now(),
    sent: false,
  };
  if (!/^[a-zA-Z0-9_/.-]+$/.test(toolId) || toolId.includes("..") || /^[/.]/.test(toolId)) {
    return send(null, { kind: "invalid_input", name: "ValidationError", message: `invalid tool id ${JSON.stringify(toolId)}` });
  }
  if (!warm) applyEnv(request.env); // spawn: loaded before the call was known, as in warm mode
  const tools = await load();
  if (tools instanceof Error) return send(null, describe(tools, "tool_error"));
  const tool = Object.hasOwn(tools, toolId) ? tools[toolId] : undefined;
  if (typeof tool !== "function") {
    const available = Object.keys(tools).filter((k) => typeof tools[k] === "function").sort();
    return send(null, {
      kind: "not_found",
      name: "NotFoundError",
      message: `Tool ${toolId} not found in entrypoint exports. Available tools: ${available.join(", ")}`,
    });
  }
  if (warm) {
    applyEnv(request.env);
    callRunning = true;
  }
  active.started = performance.now();
  delete (globalThis as Record<symbol, unknown>)[NATIVE_REFUSED]; // this call's own, if any
  try {
    const result = await (async () => {
      try {
        return await tool(request.input, request.config ?? {});
      } finally {
        endCall(); // before the envelope: no timer of this call runs after it
      }
    })();
    await send(result, null);
  } catch (e) {
    await send(null, describe(e, "tool_error"));
  } finally {
    if (warm) {
      endCall();
      restoreEnv();
      // What the call left in TMPDIR (the next call's too) is removed by the runner once
      // the reply is stored (workers/runtime/isolation.py, warm.py): not here, where it
      // would compete with that reply for the CPU.
    }
  }
}

if (check) {
  const tools = await load();
  if (tools instanceof Error) {
    toStderr(tools.message);
    process.exit(1);
  }
  toStderr(`tools: ${Object.keys(tools).filter((k) => typeof tools[k] === "function").sort().join(", ")}`);
  process.exit(0);
} else if (warm) {
  for await (const line of console) {
    if (line) await handle(line);
  }
} else {
  // Loaded and rehearsed before the request comes (a process started ahead of demand
  // waits here): a dry request naming no valid tool runs through the wrapper's own path
  // (parsing, checks, the envelope's encoding and write) into /dev/null, so the call does
  // not pay for that code's first run (~1 ms); no tool runs. The envelope pipe gets a
  // ready line, which the reader skips (it looks for the call's nonce).
  await load();
  out = Bun.file("/dev/null");
  try {
    await handle('{"tool_id":"","nonce":""}');
  } catch {
    // a rehearsal that fails costs the call its head start, nothing else
  } finally {
    out = envelope;
    active = null;
  }
  await Bun.write(envelope, "ready\n");
  await handle(await Bun.stdin.text());
  process.exit(0);
}
