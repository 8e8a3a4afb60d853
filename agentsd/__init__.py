"""agentsd: training-free Agent Attention (AgentSD) for Stable Diffusion in diffusers."""

from agentsd.patch import apply_patch, check_settings, is_patched, patch_targets, phase_history, remove_patch
from agentsd.state import AgentSDConfig

__version__ = "0.3.3"

__all__ = [
    "apply_patch",
    "remove_patch",
    "phase_history",
    "patch_targets",
    "check_settings",
    "is_patched",
    "AgentSDConfig",
    "__version__",
]
