"""The Chat tab: the chat itself (`tab.py`), compare mode (`compare.py`), and the ratings and preference pairs
that keep a user's judgement of replies as training data (`ratings.py`)."""
