// A stand-in for a small npm package (installed from a local `file:` dependency).
export function money(amount, currency) {
  return `${currency} ${Number(amount).toFixed(2)}`;
}
