"""The Serve config's import path (serving/serve_config.py's IMPORT_PATH), in a module of its own.

It joins the two sides: serve_config stays free of Ray and torch (`loraserve serve-config` and the
chart's tests read it), and serving/app.py reads serve_config's deployment options, so neither can
import the other without a circle.
"""

from __future__ import annotations

from typing import Any

from serving.app import build_app
from serving.serve_config import settings_from_args


def build_application(args: dict[str, Any]) -> Any:
    """Serve calls it with the config's `args` mapping (Ray's application builder)."""
    return build_app(settings_from_args(args))
