"""text/: what a user's data becomes before any model sees it.

reading.py (users' files: CSV/TSV/JSON/JSONL/xlsx, encodings detected, each item accounted for),
prepared.py (the prepared splits and labels.json as later stages read them), prompts.py (the prompt
contract: a text and a label set -> chat messages -> token ids, byte-identical in training, evaluation
and serving). Imports only the top of common/ (config); no torch at import time.
"""
