"""The demo behind `just demo`: the shipped examples, served end to end on a fresh clone."""
