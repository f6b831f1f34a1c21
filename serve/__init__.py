"""The text engine (LLM, OnlineEngine) and the OpenAI-compatible server."""
