// toolq's Bun wrapper: runs one Compozy-style tool call.
//
//   bun wrapper.ts <entrypoint> <envelope-fd>
//
// Reads one JSON request from stdin:
//   {tool_id, tool_exec_id, input, config, env, timeout_ms, nonce}
// and writes exactly one envelope, `<nonce>{result, error, metadata}\n`, to the
// envelope fd — a pipe of its own, so a tool's stray stdout cannot corrupt it.
// console.* goes to stderr with a level prefix, as in Compozy.
//
// I/O uses Bun's own APIs only: the first use of node:fs (readFileSync,
// writeSync) costs ~4 ms per process, process.stdout.write ~14 ms
// (bench/output_paths.py measures each route).

const MAX_OUTPUT_BYTES = 10 * 1024 * 1024;
const entrypoint = process.argv[2];
const envelopeFd = Number(process.argv[3]);

type ErrorInfo = {
  kind: string;
  name: string;
  message: string;
  stack?: string | null;
  retryable?: boolean;
};

let nonce = "";
let toolId = "";
let toolExecId = "";
let started = performance.now();
let sent = false;

const toStderr = console.error.bind(console);
for (const level of ["log", "info", "warn", "error", "debug", "trace"] as const) {
  const prefix = `[${level.toUpperCase()}]`;
  console[level] = (...args: unknown[]) => toStderr(prefix, ...args);
}

async function send(result: unknown, error: ErrorInfo | null): Promise<void> {
  if (sent) return;
  sent = true;
  const metadata = {
    tool_id: toolId,
    tool_exec_id: toolExecId,
    execution_time: Math.round(performance.now() - started),
  };
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
  await Bun.write(Bun.file(envelopeFd), `${nonce}${body}\n`);
  process.exit(error ? 1 : 0);
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

// A failure after the tool returned control (a throwing timer, a rejected
// promise nobody awaited) is still the tool's error, not a crash.
process.on("uncaughtException", (e) => send(null, describe(e, "tool_error")));
process.on("unhandledRejection", (e) => send(null, describe(e, "tool_error")));

async function main(): Promise<void> {
  let request: {
    tool_id?: unknown;
    tool_exec_id?: unknown;
    input?: unknown;
    config?: unknown;
    nonce?: unknown;
  };
  try {
    request = JSON.parse(await Bun.stdin.text());
    nonce = String(request.nonce ?? "");
    toolId = String(request.tool_id ?? "");
    toolExecId = String(request.tool_exec_id ?? "");
  } catch (e) {
    return send(null, { kind: "invalid_input", name: "ParseError", message: `invalid request: ${e}` });
  }
  if (!/^[a-zA-Z0-9_/.-]+$/.test(toolId) || toolId.includes("..") || /^[/.]/.test(toolId)) {
    return send(null, { kind: "invalid_input", name: "ValidationError", message: `invalid tool id ${JSON.stringify(toolId)}` });
  }

  let module: Record<string, unknown>;
  try {
    module = await import(entrypoint);
  } catch (e) {
    return send(null, describe(e, "tool_error", `failed to load entrypoint ${entrypoint}: ${e}`));
  }
  const exported = module.default;
  const tools = (exported && typeof exported === "object" ? exported : module) as Record<string, unknown>;
  const tool = Object.hasOwn(tools, toolId) ? tools[toolId] : undefined;
  if (typeof tool !== "function") {
    const available = Object.keys(tools).filter((k) => typeof tools[k] === "function").sort();
    return send(null, {
      kind: "not_found",
      name: "NotFoundError",
      message: `Tool ${toolId} not found in entrypoint exports. Available tools: ${available.join(", ")}`,
    });
  }

  started = performance.now();
  let result: unknown;
  try {
    result = await tool(request.input, request.config ?? {});
  } catch (e) {
    return send(null, describe(e, "tool_error"));
  }
  send(result, null);
}

await main();
