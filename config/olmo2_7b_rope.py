# The RoPE baseline of config/olmo2_7b_repo.py: the same continual pre-training (checkpoint, data,
# schedule, 50B tokens) with the model left as it is. It differs only in pos_mode (and out_dir).
#
#   torchrun --standalone --nproc_per_node=8 train.py config/olmo2_7b_rope.py
import os
import runpy

globals().update({k: v for k, v in runpy.run_path(os.path.join(os.path.dirname(__file__), "olmo2_7b_repo.py")).items()
                  if not k.startswith("_")})
pos_mode = "rope"
out_dir = "out-olmo2-7b-rope"
