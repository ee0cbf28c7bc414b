"""The Training tab: the form and run control (`tab.py`), the loss charts (`charts.py`) and the run history
(`history.py`)."""
