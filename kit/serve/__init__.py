"""Serving with vLLM: checks before a server starts (preflight), the launcher and its guard, adapters loaded
into a running server, the chat client and the container's health check. May import the packages below it: kit.core
.. kit.export."""
