"""fal-ai/lora's scheduler names and what each can take, as plain data.

Validation reads the capabilities to refuse options a scheduler would reject or silently ignore;
the worker builds the diffusers scheduler a name stands for from the same entry
(serving/schedulers.py), and `tests/serving/test_options.py` checks every flag against the real
diffusers classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str
    config: dict[str, Any] = field(default_factory=dict)
    # set_timesteps(timesteps=...) works (diffusers refuses it together with Karras sigmas)
    accepts_timesteps: bool = False
    # set_timesteps(sigmas=...) exists
    accepts_sigmas: bool = False
    # step(eta=...) exists; every other scheduler would ignore eta
    accepts_eta: bool = False
    # with rescale_betas_zero_snr the scheduler clamps the last alpha_cumprod above zero, so an
    # epsilon-prediction model stays finite; the others divide by zero at the first step (NaN)
    zero_snr_safe_for_epsilon: bool = False


SCHEDULER_SPECS: dict[str, SchedulerSpec] = {
    "DPM++ 2M": SchedulerSpec(
        "DPMSolverMultistepScheduler", {}, accepts_timesteps=True, zero_snr_safe_for_epsilon=True
    ),
    "DPM++ 2M Karras": SchedulerSpec(
        "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, zero_snr_safe_for_epsilon=True
    ),
    "DPM++ 2M SDE": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++"},
        accepts_timesteps=True,
        zero_snr_safe_for_epsilon=True,
    ),
    "DPM++ 2M SDE Karras": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        zero_snr_safe_for_epsilon=True,
    ),
    "Euler": SchedulerSpec(
        "EulerDiscreteScheduler", {}, accepts_timesteps=True, accepts_sigmas=True, zero_snr_safe_for_epsilon=True
    ),
    "Euler A": SchedulerSpec("EulerAncestralDiscreteScheduler", {}, zero_snr_safe_for_epsilon=True),
    "Euler (trailing timesteps)": SchedulerSpec(
        "EulerDiscreteScheduler",
        {"timestep_spacing": "trailing"},
        accepts_timesteps=True,
        accepts_sigmas=True,
        zero_snr_safe_for_epsilon=True,
    ),
    "LCM": SchedulerSpec("LCMScheduler", {}, accepts_timesteps=True),
    "LCM (trailing timesteps)": SchedulerSpec("LCMScheduler", {"timestep_spacing": "trailing"}, accepts_timesteps=True),
    "DDIM": SchedulerSpec("DDIMScheduler", {}, accepts_eta=True),
    "TCD": SchedulerSpec("TCDScheduler", {}, accepts_timesteps=True, accepts_eta=True),
}

# Checked by tests against the installed diffusers: these build the same schedule whatever the spacing.
SPACING_IGNORED_BY = ("LCMScheduler", "TCDScheduler")
# Schedulers whose trailing spacing is passed as custom timesteps (serving.schedulers.trailing_timesteps_if_ignored).
TRAILING_AS_CUSTOM_TIMESTEPS = tuple(
    name
    for name, spec in SCHEDULER_SPECS.items()
    if spec.class_name in SPACING_IGNORED_BY and spec.config.get("timestep_spacing") == "trailing"
)


def names_accepting(capability: str) -> list[str]:
    """Scheduler names with a capability flag set, for error messages."""
    return [name for name, spec in SCHEDULER_SPECS.items() if getattr(spec, capability)]
