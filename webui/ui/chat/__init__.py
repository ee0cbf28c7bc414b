"""The Chat tab: the chat itself (`tab.py`) and compare mode (`compare.py`)."""
