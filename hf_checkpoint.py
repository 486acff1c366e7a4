"""The earlier name of infra/hf.py (Hugging Face checkpoint directories): `import hf_checkpoint` and
`python hf_checkpoint.py <checkpoint dir>` keep working."""
import runpy

from infra.hf import *  # noqa: F401,F403

if __name__ == "__main__":
    runpy.run_module("infra.hf", run_name="__main__")
