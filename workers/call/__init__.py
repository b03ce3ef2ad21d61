"""One delivered call's life, as a short pipeline of steps (:mod:`.handler` runs them):

    decode → guard → cache → gate → admit → run → record → decide → finish

- :mod:`.decode`  read and validate the message; the tool's profile, retry policy, deadline
- :mod:`.guard`   a cancelled call, or one redelivered too often, ends before it runs
- :mod:`.cache`   a stored result answers the call; a success is stored for the next one
- :mod:`.gate`    flow control: a rate token, then a cluster slot, or wait for them
- :mod:`.admit`   the tool's circuit breaker lets the call run, defers it or ends it
- :mod:`.run`     the runtime runs the tool (cancel token, tracing span, redaction)
- :mod:`.record`  the breaker learns how the attempt went
- :mod:`.decide`  the retry policy: try again after a delay, or end
- :mod:`.finish`  the envelope, the dead letter of a failure, the log lines

:mod:`.attempt` holds what passes between the steps; :mod:`.ports` the interfaces of the
collaborators each step is given (Redis-backed in a worker, fakes in ``tests/fast``).
"""
