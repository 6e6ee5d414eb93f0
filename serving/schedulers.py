"""fal-ai/lora scheduler names → diffusers schedulers, built fresh for every request.

The table of names (class names, config overrides, capabilities) is plain data in the request
model (loraserve/request/schedulers.py), so a request is validated without torch or diffusers;
`tests/serving/test_options.py` checks every capability flag against the real diffusers classes
(`inspect` on `set_timesteps` and `step`, and what the built scheduler actually does), so the
table cannot drift from the installed diffusers silently.

A scheduler is always built with `from_config(resident.config, ...)`: the model's own noise
schedule (betas, offsets, prediction type) is kept, and the resident pipeline's scheduler object
is never touched, so one request's scheduler state cannot leak into another's.
"""

from __future__ import annotations

from typing import Any

from loraserve.request.schedulers import SCHEDULER_SPECS, SPACING_IGNORED_BY, names_accepting

# diffusers' recommendation for zero-terminal-SNR models ("Common Diffusion Noise Schedules and
# Sample Steps are Flawed", section 3.4): rescale the CFG result to fight over-exposure.
ZERO_SNR_GUIDANCE_RESCALE = 0.7
# LCM / TCD pick their steps from a grid of `original_inference_steps` (50 unless the model
# says otherwise); a request for more steps than that widens the grid instead of failing.
LCM_DEFAULT_ORIGINAL_STEPS = 50


class SchedulerOptionError(ValueError):
    """A sampling option the chosen (or the model's own) scheduler cannot honour; names the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


def build_scheduler(
    resident: Any,
    name: str | None,
    *,
    prediction_type: str | None = None,
    rescale_betas_snr_zero: bool = False,
    num_inference_steps: int | None = None,
) -> Any:
    """A new scheduler for one request; `name` None keeps the model's own scheduler class."""
    import diffusers

    if name is None:
        scheduler_class = type(resident)
        overrides: dict[str, Any] = {}
    else:
        spec = SCHEDULER_SPECS.get(name)
        if spec is None:
            raise SchedulerOptionError("scheduler", f"unknown scheduler {name!r}; one of {', '.join(SCHEDULER_SPECS)}")
        scheduler_class = getattr(diffusers, spec.class_name)
        overrides = dict(spec.config)
    if prediction_type:
        overrides["prediction_type"] = prediction_type
    if rescale_betas_snr_zero:
        overrides["rescale_betas_zero_snr"] = True
        overrides["timestep_spacing"] = "trailing"
    config = resident.config
    if "original_inference_steps" in _init_parameters(scheduler_class) and num_inference_steps:
        original = config.get("original_inference_steps", LCM_DEFAULT_ORIGINAL_STEPS)
        overrides["original_inference_steps"] = max(original, num_inference_steps)
    return scheduler_class.from_config(config, **overrides)


def check_request_options(
    scheduler: Any,
    *,
    timesteps: list[int] | None,
    sigmas: list[float] | None,
    eta: float,
    rescale_betas_snr_zero: bool,
) -> None:
    """Refuse, by field, options this scheduler instance would reject or silently ignore.

    The gateway checks the same for named schedulers; this covers the model's own scheduler,
    which only the worker knows.
    """
    import inspect

    set_timesteps = inspect.signature(scheduler.set_timesteps).parameters
    what = f"scheduler {type(scheduler).__name__}"
    if timesteps is not None:
        if "timesteps" not in set_timesteps:
            raise SchedulerOptionError(
                "timesteps",
                f"{what} cannot take a custom timestep schedule; choose one of {', '.join(names_accepting('accepts_timesteps'))}",
            )
        if any(scheduler.config.get(flag) for flag in _SIGMA_SCHEDULE_FLAGS):
            raise SchedulerOptionError(
                "timesteps", f"{what} uses Karras/exponential/beta sigmas, which cannot take custom timesteps"
            )
    if sigmas is not None and "sigmas" not in set_timesteps:
        raise SchedulerOptionError(
            "sigmas",
            f"{what} cannot take a custom sigma schedule; choose one of {', '.join(names_accepting('accepts_sigmas'))}",
        )
    if eta and "eta" not in inspect.signature(scheduler.step).parameters:
        raise SchedulerOptionError(
            "eta",
            f"{what} does not use eta; choose one of {', '.join(names_accepting('accepts_eta'))} or leave eta at 0",
        )
    if (
        rescale_betas_snr_zero
        and scheduler.config.get("prediction_type") == "epsilon"
        and not zero_snr_is_finite(scheduler)
    ):
        raise SchedulerOptionError(
            "rescale_betas_snr_zero",
            f"{what} with zero terminal SNR cannot denoise the first step of an epsilon-prediction model "
            "(it divides by zero); use prediction_type 'v_prediction' for a v-prediction model, or an "
            f"Euler / DPM++ scheduler ({', '.join(names_accepting('zero_snr_safe_for_epsilon'))})",
        )


def zero_snr_is_finite(scheduler: Any) -> bool:
    """False when the final training step has alpha_cumprod == 0 (pure noise, no signal)."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    return alphas_cumprod is None or float(alphas_cumprod[-1]) > 0.0


def trailing_timesteps_if_ignored(scheduler: Any, num_inference_steps: int) -> list[int] | None:
    """Explicit trailing timesteps for schedulers whose config takes `timestep_spacing` but ignores it.

    diffusers' LCMScheduler and TCDScheduler accept timestep_spacing="trailing" and then pick
    their steps from the LCM grid regardless, which would make "LCM (trailing timesteps)" the
    same as "LCM" (and zero-SNR rescaling lose its trailing spacing); for those the trailing
    schedule is computed here, the way EulerDiscreteScheduler computes it, and passed as
    custom timesteps.
    """
    if type(scheduler).__name__ not in SPACING_IGNORED_BY or scheduler.config.get("timestep_spacing") != "trailing":
        return None
    import numpy as np

    train_steps = scheduler.config.num_train_timesteps
    steps = np.arange(train_steps, 0, -train_steps / num_inference_steps).round() - 1
    return [int(step) for step in steps]


_SIGMA_SCHEDULE_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


def _init_parameters(scheduler_class: type) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler_class).parameters)
