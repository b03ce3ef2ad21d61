// Benchmark tools: as little work as possible, so the runtime's own cost shows.
export default {
  noop: async () => ({}),
  noop_guarded: async () => ({}),
  echo_size: async (input: { data: string }) => ({ length: input.data.length }),
  sleep: async (input: { ms: number }) => {
    await new Promise((resolve) => setTimeout(resolve, input.ms));
    return {};
  },
};
