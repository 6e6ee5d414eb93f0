"""loraserve: what callers use — generated stubs (`loraserve.v1`), the typed client, the CLI."""
