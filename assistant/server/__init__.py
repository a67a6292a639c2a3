"""`ember serve`: Ember behind an OpenAI-compatible HTTP API (FastAPI + uvicorn, imported only here)."""
