"""What every server process shares, below storage, gateway and serving: settings, structured
logs, retry backoff, redaction of secrets, model keys and the worker credential. Callers never
import it: the client distribution (`loraserve`) stands on its own."""
