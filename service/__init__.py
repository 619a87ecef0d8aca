"""Switchboard: GitOps configuration service and OpenAI-compatible gateway for LLM providers."""

__version__ = "0.1.0"
