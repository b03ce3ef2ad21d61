"""Running a call in Bun: the :class:`Runtime` seam and its two implementations.

base.py     Call, Outcome, the Runtime protocol
routing.py  ByMode: one runtime per mode, the worker's slots shared
spawn.py    a fresh Bun per call
warm.py     long-lived Bun processes, one call each at a time
pump.py     a call's pipes: request in, envelope/stdout/stderr out, limits, caps
wire.py     the request line and the envelope, read into an Outcome
secrets.py  env values kept out of stored and logged text
launch.py   start one Bun process: sandbox, cgroup, process group, environment
sandbox.py  bubblewrap and the permission flags
limits.py   cgroups, rlimits and /proc readings
reaper.py   kills a dead worker's Bun process groups
bun.py      find the Bun binary and the wrapper
wrapper.ts  the Bun side of the protocol
"""
