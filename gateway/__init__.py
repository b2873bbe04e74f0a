"""The gRPC gateway: validates and tokenizes requests, queues them in Redis, relays tokens.

`server` wires the grpc.aio server, `servicer` is the thin RPC layer, `convert` the only
protobuf translation, `service` one request's life from admission to its last message.
"""
