"""baton-runtime: a lean LLM serving runtime with pluggable batch schedulers."""

from runtime.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
