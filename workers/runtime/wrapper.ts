// toolq's Bun wrapper: runs Compozy-style tool calls.
//
//   bun wrapper.ts <entrypoint> <envelope-fd>          spawn mode: one call, then exit
//   bun wrapper.ts <entrypoint> <envelope-fd> warm     warm mode: one call per stdin line
//
// A request is one JSON object (one line in warm mode):
//   {tool_id, tool_exec_id, input, config, env, timeout_ms, nonce}
// Each call ends with exactly one envelope, `<nonce>{result, error, metadata}\n`, on
// the envelope fd — a pipe of its own, so a tool's stray stdout cannot corrupt it.
// console.* goes to stderr with a level prefix, as in Compozy.
//
// I/O uses Bun's own APIs only: the first use of node:fs (readFileSync,
// writeSync) costs ~4 ms per process, process.stdout.write ~14 ms
// (bench/output_paths.py measures each route).

const MAX_OUTPUT_BYTES = 10 * 1024 * 1024;
const entrypoint = process.argv[2];
const envelope = Bun.file(Number(process.argv[3]));
let out = envelope; // where send() writes: the envelope, or /dev/null for a rehearsal
const warm = process.argv[4] === "warm";

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

function describe(e: unknown, kind: string, message?: string): ErrorInfo {
  const err = e instanceof Error ? e : null;
  const info: ErrorInfo = {
    kind,
    name: err?.name ?? "Error",
    message: message ?? (err ? err.message : String(e)),
    stack: err?.stack ?? null,
  };
  const retryable = (e as { retryable?: unknown } | null)?.retryable;
  if (typeof retryable === "boolean") info.retryable = retryable;
  return info;
}

// A failure outside the tool's own promise is still the call's error. In warm mode
// the process may hold state the failure left broken, so it exits and is replaced.
async function onLateError(e: unknown): Promise<void> {
  await send(null, describe(e, "tool_error"), true);
  process.exit(1);
}
process.on("uncaughtException", onLateError);
process.on("unhandledRejection", onLateError);

const loaded: Promise<Record<string, unknown> | Error> = import(entrypoint).then(
  (module) => {
    const exported = module.default;
    return (exported && typeof exported === "object" ? exported : module) as Record<string, unknown>;
  },
  (e) => new Error(`failed to load entrypoint ${entrypoint}: ${e}`),
);

const baseEnv = { ...process.env };

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
  const tools = await loaded;
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
  // Spawn mode too: a process started ahead of its call learns the call's env here.
  applyEnv(request.env);
  active.started = performance.now();
  try {
    const result = await tool(request.input, request.config ?? {});
    await send(result, null);
  } catch (e) {
    await send(null, describe(e, "tool_error"));
  } finally {
    if (warm) restoreEnv();
  }
}

if (warm) {
  for await (const line of console) {
    if (line) await handle(line);
  }
} else {
  // Loaded and rehearsed before the request comes (a process started ahead of demand
  // waits here): a dry request naming no valid tool runs through the wrapper's own path
  // (parsing, checks, the envelope's encoding and write) into /dev/null, so the call does
  // not pay for that code's first run (~1 ms); no tool runs. The envelope pipe gets a
  // ready line, which the reader skips (it looks for the call's nonce).
  await loaded;
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
