"""Hugging Face interoperability: tokenizer files both ways (tokenizer.py) and the remote code that
runs RePo, NoPE and mixed models in stock transformers (remote_code.py, remote/)."""
