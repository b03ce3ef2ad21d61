// The corpus tier (tests/test_corpus.py): widely used npm packages, each imported and used
// for something small by a tool of its own, under default permissions, sandboxed, with no
// network. Imports are dynamic, inside each tool (but for two, below): a package that fails
// to load fails its own tool only, at the call.
//
// Tools of packages that load native code (sharp, @node-rs/argon2) fail without
// --allow-ffi with toolq's error; their `_ffi` twins are granted it (compozy.yaml).

// Loaded with the entrypoint, so the worker's start-up check loads them under default
// permissions too: both copy `process` at import, which refused the whole project before.
import { Chalk } from "chalk";
import { Command } from "commander";

type Tool = () => Promise<unknown>;

const tools: Record<string, Tool> = {
  async prettier() {
    const prettier = await import("prettier");
    return await prettier.format("const  x = {a:1}", { parser: "babel" });
  },
  async chalk() {
    return new Chalk({ level: 1 }).red("red");
  },
  async commander() {
    const program = new Command().option("-n, --name <name>").exitOverride();
    program.parse(["node", "tool", "--name", "corpus"]);
    return program.opts().name;
  },
  async got() {
    const { default: got } = await import("got");
    const client = got.extend({ prefixUrl: "https://example.invalid/api", timeout: { request: 1000 } });
    return client.defaults.options.prefixUrl.toString();
  },
  async zod() {
    const { z } = await import("zod");
    return z.object({ n: z.number().int() }).parse({ n: 3 }).n;
  },
  async lodash() {
    const { default: _ } = await import("lodash");
    return _.chunk([1, 2, 3, 4, 5], 2);
  },
  async axios() {
    const { default: axios } = await import("axios");
    return axios.create({ baseURL: "https://example.invalid" }).getUri({ url: "/x", params: { q: 1 } });
  },
  async ajv() {
    const { default: Ajv } = await import("ajv");
    const validate = new Ajv().compile({ type: "object", required: ["a"] });
    return [validate({ a: 1 }), validate({})];
  },
  async "date-fns"() {
    const { addDays, formatISO } = await import("date-fns");
    return formatISO(addDays(new Date(Date.UTC(2024, 0, 31, 12)), 1), { representation: "date" });
  },
  async cheerio() {
    const cheerio = await import("cheerio");
    return cheerio.load("<ul><li>a</li><li>b</li></ul>")("li").length;
  },
  async yaml() {
    const YAML = await import("yaml");
    return YAML.parse("a: [1, 2]\n");
  },
  async uuid() {
    const { v4, validate } = await import("uuid");
    return validate(v4());
  },
  async openai() {
    const { default: OpenAI } = await import("openai");
    return new OpenAI({ apiKey: "sk-corpus", baseURL: "https://example.invalid/v1" }).baseURL;
  },
  async "@anthropic-ai/sdk"() {
    const { default: Anthropic } = await import("@anthropic-ai/sdk");
    return new Anthropic({ apiKey: "corpus", baseURL: "https://example.invalid" }).baseURL;
  },
  async ioredis() {
    const { default: Redis } = await import("ioredis");
    const redis = new Redis({ lazyConnect: true, port: 6390 });
    const status = redis.status;
    redis.disconnect();
    return status;
  },
  async pg() {
    const { default: pg } = await import("pg");
    return new pg.Client({ host: "example.invalid" }).escapeLiteral("it's");
  },
  async "node-fetch"() {
    const { Headers, Request } = await import("node-fetch");
    return new Request("https://example.invalid/x", { headers: new Headers({ a: "1" }) }).headers.get("a");
  },
  async dotenv() {
    const { parse } = await import("dotenv");
    return parse("A=1\nB=two\n");
  },
  async marked() {
    const { marked } = await import("marked");
    return await marked.parse("# hi");
  },
  async jsdom() {
    const { JSDOM } = await import("jsdom");
    return new JSDOM("<p>hello</p>").window.document.querySelector("p")?.textContent;
  },
  async "@octokit/rest"() {
    const { Octokit } = await import("@octokit/rest");
    const octokit = new Octokit({ auth: "corpus", baseUrl: "https://example.invalid" });
    return octokit.request.endpoint("GET /repos/{owner}/{repo}", { owner: "o", repo: "r" }).url;
  },
  async googleapis() {
    const { google } = await import("googleapis");
    return typeof google.sheets({ version: "v4" }).spreadsheets.get;
  },
  async langchain() {
    const { PromptTemplate } = await import("@langchain/core/prompts");
    await import("langchain");
    return await PromptTemplate.fromTemplate("Hello {name}").format({ name: "corpus" });
  },
  async "@modelcontextprotocol/sdk"() {
    const { McpServer } = await import("@modelcontextprotocol/sdk/server/mcp.js");
    const server = new McpServer({ name: "corpus", version: "1.0.0" });
    server.tool("add", async () => ({ content: [{ type: "text", text: "3" }] }));
    return server.server !== undefined;
  },
  async "p-limit"() {
    const { default: pLimit } = await import("p-limit");
    const limit = pLimit(2);
    return await Promise.all([1, 2, 3].map((n) => limit(async () => n * 2)));
  },
  async express() {
    const { default: express } = await import("express");
    const app = express();
    app.get("/x", (_req, res) => res.send("x"));
    return typeof app.listen;
  },
  async dayjs() {
    const { default: dayjs } = await import("dayjs");
    return dayjs("2024-01-31").add(1, "day").format("YYYY-MM-DD");
  },
  async semver() {
    const semver = await import("semver");
    return semver.satisfies("1.2.3", "^1.0.0");
  },
  async nanoid() {
    const { nanoid } = await import("nanoid");
    return nanoid(10).length;
  },
  async "js-yaml"() {
    const yaml = await import("js-yaml");
    return yaml.load("a: 1");
  },
  async debug() {
    const { default: debug } = await import("debug");
    return debug("corpus").namespace;
  },
  async minimist() {
    const { default: minimist } = await import("minimist");
    return minimist(["--a", "1", "b"]);
  },
  // native code: a Node-API addon each (their binaries come as npm packages)
  async sharp() {
    const { default: sharp } = await import("sharp");
    const png = await sharp({ create: { width: 2, height: 2, channels: 3, background: "red" } })
      .png()
      .toBuffer();
    return (await sharp(png).metadata()).width;
  },
  async "@node-rs/argon2"() {
    const { hash, verify } = await import("@node-rs/argon2");
    return await verify(await hash("corpus"), "corpus");
  },
};

// Tool ids are the package names in identifier form (@node-rs/argon2 -> node_rs_argon2).
const exported: Record<string, Tool> = {};
for (const [name, use] of Object.entries(tools)) {
  const id = name.replace(/^@/, "").replace(/[^a-zA-Z0-9]/g, "_");
  exported[id] = use;
  exported[`${id}_ffi`] = use;
}
export default exported;
