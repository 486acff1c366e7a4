"""Data for nanoRePo: tokenizers (tokenizer.py), token files (tokens.py) and the scripts that prepare
them (stdlib_text.py: the embedded default corpus; prepare.py: any folder of .txt/.jsonl).
See README.md, section "Training", for the data layout."""
