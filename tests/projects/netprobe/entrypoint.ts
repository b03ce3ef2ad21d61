// Every way a tool may try to reach a host: fetch, raw TCP (Bun.connect, node:net), UDP
// (node:dgram). Each answers {ok, ...} or {ok: false, error}: a refusal is data, not a throw.
import dgram from "node:dgram";
import http from "node:http";
import net from "node:net";

type Target = { host: string; port: number };

function bracket(host: string): string {
  return host.includes(":") && !host.startsWith("[") ? `[${host}]` : host;
}

async function viaFetch(url: string): Promise<Record<string, unknown>> {
  try {
    const response = await fetch(url, { signal: AbortSignal.timeout(8000) });
    return { ok: response.ok, status: response.status, body: (await response.text()).slice(0, 500) };
  } catch (e) {
    return { ok: false, error: String(e) };
  }
}

// Sends a Redis PING (harmless for an HTTP server, which answers 400) and reports what came back.
function viaBunConnect({ host, port }: Target): Promise<Record<string, unknown>> {
  return new Promise((resolve) => {
    let got = "";
    const timer = setTimeout(() => resolve({ ok: got.length > 0, reply: got, timeout: true }), 3000);
    Bun.connect({
      hostname: host,
      port,
      socket: {
        open(socket) {
          socket.write("PING\r\n");
        },
        data(socket, chunk) {
          got += chunk.toString();
          clearTimeout(timer);
          socket.end();
          resolve({ ok: true, reply: got.slice(0, 200) });
        },
        error(_socket, e) {
          clearTimeout(timer);
          resolve({ ok: false, error: String(e) });
        },
        connectError(_socket, e) {
          clearTimeout(timer);
          resolve({ ok: false, error: String(e) });
        },
      },
    }).catch((e) => {
      clearTimeout(timer);
      resolve({ ok: false, error: String(e) });
    });
  });
}

function viaNodeNet({ host, port }: Target): Promise<Record<string, unknown>> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port });
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ ok: false, error: "timeout" });
    }, 3000);
    socket.on("connect", () => socket.write("PING\r\n"));
    socket.on("data", (chunk) => {
      clearTimeout(timer);
      socket.destroy();
      resolve({ ok: true, reply: chunk.toString().slice(0, 200) });
    });
    socket.on("error", (e) => {
      clearTimeout(timer);
      resolve({ ok: false, error: String(e) });
    });
  });
}

// node:http ignores HTTP_PROXY in Bun: it reaches the proxy only through netshim.
function viaNodeHttp(url: string): Promise<Record<string, unknown>> {
  return new Promise((resolve) => {
    const request = http.get(url, { timeout: 8000 }, (response) => {
      let body = "";
      response.on("data", (chunk) => (body += chunk));
      response.on("end", () => resolve({ ok: true, status: response.statusCode, body: body.slice(0, 500) }));
    });
    request.on("error", (e) => resolve({ ok: false, error: String(e) }));
    request.on("timeout", () => request.destroy(new Error("timeout")));
  });
}

function viaUdp({ host, port }: Target): Promise<Record<string, unknown>> {
  return new Promise((resolve) => {
    const socket = dgram.createSocket(host.includes(":") ? "udp6" : "udp4");
    const timer = setTimeout(() => {
      socket.close();
      resolve({ ok: false, error: "no answer" });
    }, 1500);
    socket.on("message", (msg) => {
      clearTimeout(timer);
      socket.close();
      resolve({ ok: true, reply: msg.toString().slice(0, 200) });
    });
    socket.on("error", (e) => {
      clearTimeout(timer);
      socket.close();
      resolve({ ok: false, error: String(e) });
    });
    socket.send("ping", port, host, (e) => {
      if (e) {
        clearTimeout(timer);
        socket.close();
        resolve({ ok: false, error: String(e) });
      }
    });
  });
}

// Opens `count` CONNECT tunnels through the proxy and leaves them open (the call returns
// with them still open): what a leaky or hostile tool does to the egress proxy.
async function holdTunnels(input: { count: number; target: string }): Promise<Record<string, unknown>> {
  const proxy = new URL(process.env.HTTPS_PROXY ?? "http://127.0.0.1:1");
  const answers: string[] = [];
  for (let i = 0; i < input.count; i++) {
    answers.push(
      await new Promise<string>((resolve) => {
        Bun.connect({
          hostname: proxy.hostname,
          port: Number(proxy.port),
          socket: {
            open(socket) {
              socket.write(`CONNECT ${input.target} HTTP/1.1\r\nHost: ${input.target}\r\n\r\n`);
            },
            data(_socket, chunk) {
              resolve(chunk.toString().split("\r\n")[0]);
            },
            error(_socket, e) {
              resolve(String(e));
            },
            close() {
              resolve("closed");
            },
          },
        }).catch((e) => resolve(String(e)));
      }),
    );
  }
  return { ok: true, answers };
}

export default {
  fetch: (input: { url: string }) => viaFetch(input.url),
  fetch_all: async (input: { urls: string[] }) => {
    const answers = [];
    for (const url of input.urls) answers.push(await viaFetch(url));
    return { answers };
  },
  connect: (input: Target) => viaBunConnect(input),
  node_http: (input: { url: string }) => viaNodeHttp(input.url),
  node_net: (input: Target) => viaNodeNet(input),
  udp: (input: Target) => viaUdp(input),
  // One call, every route to one host:port.
  every_route: async (input: Target) => ({
    fetch: await viaFetch(`http://${bracket(input.host)}:${input.port}/`),
    fetch_https: await viaFetch(`https://${bracket(input.host)}:${input.port}/`),
    connect: await viaBunConnect(input),
    node_net: await viaNodeNet(input),
    node_http: await viaNodeHttp(`http://${bracket(input.host)}:${input.port}/node`),
    udp: await viaUdp(input),
  }),
  hold_tunnels: holdTunnels,
};
