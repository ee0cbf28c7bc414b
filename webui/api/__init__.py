"""The OpenAI-compatible HTTP API (routes under /v1 and their pydantic schemas); a thin client of the Engine."""
