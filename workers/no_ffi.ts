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

const refuse = (): never => {
  throw new Error("toolq: native code (bun:ffi, Bun.FFI, process.dlopen, SQLite extensions) needs --allow-ffi");
};

function seal(target: object, keys: string[]): void {
  for (const key of keys) Object.defineProperty(target, key, { get: refuse, configurable: false });
}

const ffi = require("bun:ffi");
seal(ffi, Object.keys(ffi));
seal(Bun.FFI, Object.getOwnPropertyNames(Bun.FFI));
seal(process, ["dlopen"]);
// SQLite extensions are shared libraries: loading one runs its code.
const sqlite = require("bun:sqlite");
seal(sqlite.Database.prototype, ["loadExtension"]);
seal(sqlite.Database, ["setCustomSQLite"]);

const self = import.meta.path;

// A Worker constructor that always preloads this file first.
function preloading<T extends new (...args: any[]) => object>(Base: T): T {
  const Wrapped = function (this: unknown, url: unknown, options?: { preload?: string | string[] }) {
    const preload = [self, ...([] as string[]).concat(options?.preload ?? [])];
    return Reflect.construct(Base, [url, { ...options, preload }], new.target ?? Wrapped);
  } as unknown as T;
  Wrapped.prototype = Base.prototype;
  return Wrapped;
}

Object.defineProperty(globalThis, "Worker", {
  value: preloading(globalThis.Worker),
  writable: false,
  configurable: false,
});
const threads = require("node:worker_threads");
Object.defineProperty(threads, "Worker", {
  value: preloading(threads.Worker),
  writable: false,
  configurable: false,
});
