// A package of the monorepo, used by the desk as a `workspace:*` dependency.
const PRICES: Record<string, number> = { ACME: 12.5, GLOBX: 40, INIT: 3.25 };

export function price(symbol: string): number {
  const found = PRICES[symbol];
  if (found === undefined) throw new Error(`unknown symbol ${symbol}`);
  return found;
}
