// The weather desk's tools, in Compozy's convention: (input, config) => result.
import { money } from "tiny-format";

type Config = Record<string, unknown>;

export default {
  async weather_lookup(input: { city: string; units: string }, config: Config) {
    const token = process.env.WEATHER_TOKEN ?? "";
    console.log(`calling ${config.base_url} with ${process.env.WEATHER_AUTH}`);
    if (config.fail) throw new Error("service refused the token");
    return {
      city: input.city,
      units: input.units,
      temperature: input.units === "imperial" ? 70 : 21,
      base_url: config.base_url,
      format: config.format,
      retries: config.retries,
      region: process.env.REGION,
      token_length: token.length,
    };
  },
  async format_price(input: { amount: number }, config: Config) {
    return { text: money(input.amount, String(config.currency)) };
  },
  async forecast_summary() {
    return { total: "a lot" };
  },
  async slow_station() {
    await Bun.sleep(5000);
    return { late: true };
  },
  async runtime_info() {
    return {
      runtime: process.env.COMPOZY_RUNTIME,
      root: process.env.COMPOZY_PROJECT_ROOT,
      cwd: process.cwd(),
    };
  },
  async always_down() {
    throw new Error("upstream is down");
  },
  async inline_greeting(input: { who: string; greeting: string }, config: Config) {
    return { text: `${input.greeting}, ${input.who}!`, config };
  },
  async whoami() {
    return { project: "weather-desk" };
  },
};
