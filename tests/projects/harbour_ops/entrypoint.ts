export default {
  async always_down() {
    return { up: true };
  },
  async whoami() {
    return { project: "harbour-ops" };
  },
};
