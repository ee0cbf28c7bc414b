"""Test and benchmark fixtures: tiny offline models (`tiny_models`) and a local stand-in for the Hugging Face
hub (`fake_hub`). Nothing in the app imports this package; `tests/` and `bench/` do, so that neither needs
the network nor imports the other."""
