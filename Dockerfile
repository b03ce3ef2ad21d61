# toolq worker image: Python 3.11, Bun from the pinned npm package, toolq itself (with the
# otel extra: tracing is used only when OTEL_* configures it).
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update \
    && apt-get install -y --no-install-recommends nodejs npm bubblewrap gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# Bun from npm (package.json pins it), installed where the runner looks: ./node_modules.
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund && node_modules/.bin/bun --version
COPY . .
# The raw-socket route through the egress proxy (docs/security/network.md) and the cgroup
# join before bwrap (one static exec instead of a shell and setpriv), shipped in the package.
RUN cc -O2 -shared -fPIC -o workers/runtime/netshim.so workers/runtime/netshim.c -ldl -lpthread \
    && cc -O2 -static -o workers/runtime/cgjoin workers/runtime/cgjoin.c \
    && pip install --no-cache-dir '.[otel]'
# exec form: SIGTERM reaches the worker, which finishes running calls (warm shutdown).
CMD ["toolq", "worker"]
