"""OpenAI-compatible HTTP server for cdlm (FastAPI + uvicorn, engine in its own thread)."""
