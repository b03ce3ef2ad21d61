// Spawn mode's irreducible start (`toolq bench`): what any sandboxed call must do and no
// more. Bun, in the same sandbox as a spawned tool, loads the entrypoint, reads the
// request, runs the tool and writes its result to the envelope fd: no toolq wrapper, no
// guards, no cgroup.
//
//   bun floor.ts <entrypoint> <envelope-fd>
const tools = (await import(process.argv[2])).default;
const request = JSON.parse(await Bun.stdin.text());
const result = await tools[request.tool_id](request.input, request.config);
await Bun.write(Bun.file(Number(process.argv[3])), `${request.nonce}${JSON.stringify({ result, error: null })}\n`);
