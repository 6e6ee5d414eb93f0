"""The gateway: public gRPC API, request queue, dispatcher to the Ray Serve workers, file serving."""
