# The paper's 7B run: continual pre-training of OLMo-2-1124-7B with RePo from layer 10 (the authors'
# floor(32/3)) on 50B tokens of OLMo-2's stage-2 (Dolmino) mix, sharded with FSDP2. The authors' 7B
# config (OLMo2-7B-stage2-seed42-SEXMH-L10) is their 1B recipe (config/olmo2_1b_repo.py: AdamW,
# weight decay, no warmup, linear decay to 0, clip, z-loss, bf16) with the differences below.
#
#   torchrun --standalone --nproc_per_node=8 train.py config/olmo2_7b_repo.py
#   python train.py config/olmo2_7b_repo.py --dry_run --dry_run_world=8     # the memory plan, no GPU needed
#
# init_from: a local Hugging Face directory of OLMo-2-1124-7B at the END OF STAGE 1 (OLMo's
# checkpoint peteish7 step 928646), not the released final model, which already went through stage 2.
# dataset: the Dolmino mix prepared as data/dolmino (README, "Data"). As for 1B, the stage-1 Adam
# moments are not in HF checkpoints: AdamW starts from zero moments here, under the 1B preset's
# 200-step warmup (1.7% of this run).
import os
import runpy

globals().update({k: v for k, v in runpy.run_path(os.path.join(os.path.dirname(__file__), "olmo2_1b_repo.py")).items()
                  if not k.startswith("_")})
out_dir = "out-olmo2-7b-repo"
init_from = "OLMo-2-1124-7B-stage1"
repo_start_layer = 10               # layers 0-9 keep RoPE, 10-31 get fresh positioners
# OLMo-2-1124-7B's shape, as its config.json gives it (OLMo's "mlp_hidden_size 22016" is gate + up)
n_layer = 32
n_head = 32
n_embd = 4096
intermediate_size = 11008

batch_size = 4                      # sequences per GPU and micro-step; the authors' 7B script: 2. Each
                                    # micro-step all-gathers the whole model twice whatever its size: 4
                                    # halves that traffic per step and fits (--dry_run, every block
                                    # recomputed: 34.5 GiB of 72 on 8 x H100; 8: 48.4; docs/cluster.md)
gradient_accumulation_steps = 256   # x 4 = 1024 sequences x 4096 = 4,194,304 tokens per step
max_iters = 11931                   # OLMo's stop_at: 50e9 tokens / 4,194,304 rounded up, + 10
lr_decay_iters = 11921              # linear to zero here; the last 10 steps run at min_lr = 0
learning_rate = 6.1499e-5
fsdp = True                         # parameters, gradients and AdamW state sharded over the GPUs
activation_checkpointing = True     # without it the saved activations alone exceed an H100 (--dry_run)
activation_checkpointing_layers = 26  # only blocks 0-25 recompute: 62.8 GiB of 72 (--dry_run; 25 is the least
                                    # that fits, one block kept as margin: the plan is counted, not measured)
# a step is ~1 min on 8 nodes: the 1B preset's 1000-step interval would risk ~17 hours of work
ckpt_interval = 200                 # ~3.5 hours between checkpoints (eval_interval stays 1000)
