"""The web layer: the FastAPI app that hosts the Gradio UI and the API routes (`server.py`) and the login gate
in front of every Gradio route (`gate.py`, for --auth)."""
