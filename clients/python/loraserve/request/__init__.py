"""The request model: what one GenerateInput may be.

fal's defaults and enumerations (`schema`), fal's JSON read into a GenerateInput (`fal_json`), every
rule a request must keep (`validation`, `conditioning_validation`, `sync_mode`, the scheduler table
in `schedulers`), and refusals as field violations without any transport's codes (`violations`).
The gateway runs it before a request is queued and the worker again before it generates; each maps
`InvalidInput` to its own answer (gRPC INVALID_ARGUMENT / fal's 422, a failed request of type
INVALID_INPUT). It imports the generated stubs, protobuf and the standard library only, so the client
parses and checks a request exactly as the service will.
"""
