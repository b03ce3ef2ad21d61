import { writeFileSync } from "node:fs";
import { price } from "@market/pricing";
import quote from "./tools/quote.ts";

export default {
  quote,
  async basket(input: { symbols: string[] }) {
    return { quotes: input.symbols.map((symbol) => ({ symbol, price: price(symbol), currency: "EUR" })) };
  },
  async bad_quote(input: { symbol: string }) {
    return { symbol: input.symbol, price: "call us", currency: "EUR" };
  },
  // What the sandbox refuses without a grant (runtime.permissions has only --allow-read).
  async market_status(input: { url: string }) {
    const response = await fetch(input.url);
    return { status: response.status };
  },
  async save_note(input: { text: string }) {
    writeFileSync(`${process.env.COMPOZY_PROJECT_ROOT}/notes.txt`, input.text);
    return { saved: true };
  },
};
