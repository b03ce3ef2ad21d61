// Without --allow-ffi: every route from JavaScript to native code that toolq knows of
// throws. Loaded by the wrapper before the tool's module, and preloaded into every
// Worker the tool starts (a Worker has module objects of its own).
//
// Routes closed: `bun:ffi` (import, require, the bare `ffi` alias: one object), `Bun.FFI`,
// `process.dlopen` (also what `require("x.node")` and Node-API plugins go through),
// `bun:sqlite`'s `loadExtension` and `setCustomSQLite` (both dlopen a library), and
// Workers (`Worker`, `node:worker_threads`) started without this file. A JavaScript-level
// guarantee: an unknown route in Bun would bypass it, not the sandbox around it (uid
// 65534, seccomp, the filesystem).

//
// A route is refused when it is *used* (called or constructed), never when it is read:
// code that copies, spreads or enumerates `process` or `bun:ffi` (chalk, commander,
// prettier and got do, at import) sees a function that throws when called.

const REFUSAL = "toolq: native code (bun:ffi, Bun.FFI, process.dlopen, SQLite extensions) needs --allow-ffi";
const refuse = (): never => {
  // Recorded for the wrapper: a package that wraps this error in its own ("Cannot find
  // native binding") still tells its user which grant was missing.
  (globalThis as Record<symbol, unknown>)[Symbol.for("toolq.nativeRefused")] = REFUSAL;
  throw new Error(REFUSAL);
};

// What stands in for `value`: functions (and classes) throw when called or constructed,
// objects are frozen copies of stand-ins, plain values (FFIType's numbers) stay.
function disarm(value: unknown): unknown {
  if (typeof value === "function") {
    return function refused() {
      refuse();
    };
  }
  if (value !== null && typeof value === "object") {
    const copy: Record<string, unknown> = {};
    for (const key of Object.keys(value)) copy[key] = disarm((value as Record<string, unknown>)[key]);
    return Object.freeze(copy);
  }
  return value;
}

function seal(target: object, keys: string[]): void {
  for (const key of keys) {
    const enumerable = Object.getOwnPropertyDescriptor(target, key)?.enumerable ?? true;
    const value = disarm((target as Record<string, unknown>)[key]);
    Object.defineProperty(target, key, { value, enumerable, writable: false, configurable: false });
  }
}

const ffi = require("bun:ffi");
seal(ffi, Object.keys(ffi));
seal(Bun.FFI, Object.getOwnPropertyNames(Bun.FFI));
seal(process, ["dlopen"]);
// SQLite extensions are shared libraries: loading one runs its code.
const sqlite = require("bun:sqlite");
seal(sqlite.Database.prototype, ["loadExtension"]);
seal(sqlite.Database, ["setCustomSQLite"]);
const nodeSqlite = require("node:sqlite");
seal(nodeSqlite.DatabaseSync.prototype, ["loadExtension", "enableLoadExtension"]);

const self = import.meta.path;

// Replaces a constructor on `owner` (and as its prototype's `constructor`, which would
// otherwise hand the original back) with one that passes its arguments through `adjust`.
function guard(owner: object, name: string, adjust: (args: any[]) => any[]): void {
  const Base = (owner as Record<string, new (...args: any[]) => object>)[name];
  const Guarded = function (this: unknown, ...args: any[]) {
    return Reflect.construct(Base, adjust(args), new.target ?? Guarded);
  } as unknown as typeof Base;
  Guarded.prototype = Base.prototype;
  Object.defineProperty(Base.prototype, "constructor", { value: Guarded, writable: false, configurable: false });
  Object.defineProperty(owner, name, { value: Guarded, writable: false, configurable: false });
}

// Every Worker preloads this file first (a Worker has module objects of its own).
const preloading = ([url, options]: any[]) => [
  url,
  { ...options, preload: [self, ...([] as string[]).concat(options?.preload ?? [])] },
];
guard(globalThis, "Worker", preloading);
guard(require("node:worker_threads"), "Worker", preloading);
// node:sqlite's allowExtension would enable SQL's load_extension().
guard(nodeSqlite, "DatabaseSync", ([path, options]: any[]) => {
  if (options?.allowExtension) refuse();
  return options === undefined ? [path] : [path, options];
});
