import { price } from "@market/pricing";

// One tool per file, default-exported; the entrypoint gathers them.
export default async function quote(input: { symbol: string; qty: number }) {
  return { symbol: input.symbol, price: price(input.symbol) * input.qty, currency: "EUR" };
}
