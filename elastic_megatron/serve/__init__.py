"""Serving: one checkpoint, every budget, per request (engine.py decodes, app.py speaks OpenAI's HTTP API)."""
