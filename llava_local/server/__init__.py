"""OpenAI-compatible HTTP server for llava-local (FastAPI app, image fetching, request limits)."""
