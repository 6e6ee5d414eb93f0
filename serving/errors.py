"""The typed errors of the serving core, in a leaf module so that every serving module can raise them.

serving/app.py maps each to a status (`_FAILURES`); messages name the file or model and the reason,
never a stack trace.
"""

from __future__ import annotations


class ModelLoadError(Exception):
    """A base model could not be loaded; the message names the model and the reason."""


class AdapterLoadError(Exception):
    """A LoRA could not be loaded; the message names the file and the reason."""


class PipelineReleased(ModelLoadError):
    """The pipeline was evicted and its memory freed before this request could use it; load it again."""


class GenerationCancelled(Exception):
    """The caller asked to stop mid-denoise; no partial images are returned."""


class OptionUnavailableError(Exception):
    """A request option this worker or this model cannot honour; `field_name` names the input field.

    Raised before any denoising, e.g. `enable_safety_checker` with no checker configured, or
    custom `timesteps` / `eta` that the model's own scheduler would reject or ignore.
    """

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field_name = field_name


def reason(exc: BaseException, limit: int = 400) -> str:
    """One short line a caller can act on, for the messages of these errors: torch's shape errors (and
    diffusers' converters) put the useful part on line two, and some run to pages."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join([f"{type(exc).__name__}:", *lines[:2]])
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text + (f" (+{len(lines) - 2} more lines)" if len(lines) > 2 else "")
