"""The top layer: the `npuserve` console script and `npuserve up`, which runs the whole stack.

Layers, lowest first: `protos`, `common`, `preprocess`, then `gateway` and `worker` side by
side, then this package. The root command line registers the subcommands of every package, and
`up` starts Redis, a gateway and a worker as child processes, so both sit above the gateway and
the worker alike: under `worker/` the gateway could not use them, under `gateway/` the worker
could not, and in `common/` they would reach upward. Nothing imports this package but tests.
"""
