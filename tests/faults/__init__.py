"""Fault tests through the real service: processes killed, streams dropped, nothing lost."""
