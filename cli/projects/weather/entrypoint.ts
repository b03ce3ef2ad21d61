// Example Compozy tool project: the default export maps tool ids to async functions.
// Each tool gets (input, config) and returns a JSON value (objects are returned as is,
// other values as {"value": v}).

type WeatherData = { city: string; temperature_c: number; conditions: string; humidity: number };

const CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy"];

// A module-level cache, bounded as the performance guide recommends.
const cache = new Map<string, WeatherData>();

function hash(text: string): number {
  let h = 2166136261;
  for (const ch of text) h = Math.imul(h ^ ch.codePointAt(0)!, 16777619) >>> 0;
  return h;
}

export default {
  // Deterministic, offline "weather": the same city always gets the same report.
  async weather(input: { city?: string }) {
    if (!input?.city || typeof input.city !== "string") {
      throw new Error("Invalid city parameter");
    }
    const key = input.city.toLowerCase();
    const cached = cache.get(key);
    if (cached) return cached;
    const h = hash(key);
    const report: WeatherData = {
      city: input.city,
      temperature_c: ((h >>> 8) % 40) - 5,
      conditions: CONDITIONS[(h >>> 16) % CONDITIONS.length],
      humidity: 30 + ((h >>> 4) % 60),
    };
    if (cache.size > 100) cache.clear();
    cache.set(key, report);
    return report;
  },

  async slugify(input: { text: string }) {
    return input.text
      .normalize("NFKD")
      .replace(/[\u0300-\u036f]/g, "")
      .toLowerCase()
      .replace(/[^a-z0-9]+/g, "-")
      .replace(/^-|-$/g, "");
  },

  async sum(input: { numbers: number[] }) {
    return { total: input.numbers.reduce((a, b) => a + b, 0), count: input.numbers.length };
  },

  async greet(input: { name?: string }) {
    console.log(`greeting ${input?.name ?? "world"}`);
    return { message: `Hello, ${input?.name ?? "world"}! (from ${process.env.GREETER ?? "toolq"})` };
  },

  // Takes longer than its configured 1s timeout: ends as a `timeout` failure.
  async slow_report(input: { ms?: number }) {
    await new Promise((resolve) => setTimeout(resolve, input?.ms ?? 5000));
    return { done: true };
  },
};
