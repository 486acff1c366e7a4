"""The machinery behind the tutorial files: verified checkpoints, the out_dir lock and stop signals
(checkpoint.py), FSDP2 shard-aware init (fsdp.py), the chunked LM loss (loss.py), the memory plan
(memory.py), Hugging Face checkpoint directories (hf.py), atomic file writes (files.py) and
progress lines with the time left (progress.py)."""
