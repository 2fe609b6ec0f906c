"""A baton-runtime scheduler plugin: shortest-prompt-first admission with an aging guard."""

from sjf_scheduler.scheduler import ShortestPromptFirst

__all__ = ["ShortestPromptFirst"]
__version__ = "0.1.0"
