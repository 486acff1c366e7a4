"""The Triton machinery behind rope_kernel.py: launch configs and the rotation kernel (triton_rope.py),
input checks, the "auto" choice and the "rotary" backend as custom ops (ops.py), and the winners a GPU
measured, which "auto" follows (auto_table.py, auto_table.json)."""
