# The paper's 1B run: continual pre-training of OLMo-2-0425-1B with RePo from layer 5 on 50B tokens
# of OLMo-2's stage-2 (Dolmino) mix. Numbers from the authors' config
# OLMo2-1B-stage2-seed42-SEXMH-L5.yaml (arXiv 2512.14391; see README, "Training").
#
#   torchrun --standalone --nproc_per_node=8 train.py config/olmo2_1b_repo.py
#
# init_from: a local Hugging Face directory. The paper starts from the END OF STAGE 1 (OLMo's
# checkpoint step 1907359, ~4T tokens), not from the released final model, which already went
# through stage 2: download that intermediate revision of allenai/OLMo-2-0425-1B (the model card
# lists the revisions). dataset: the Dolmino mix prepared as data/dolmino (README, "Data").
# Not reproduced: the authors also loaded stage 1's Adam moments; HF checkpoints do not carry them,
# so AdamW starts from zero moments here, and a 200-step warmup replaces them (warmup_iters below).
out_dir = "out-olmo2-1b-repo"
init_from = "OLMo-2-0425-1B-stage1"
dataset = "dolmino"
pos_mode = "repo"
repo_start_layer = 5                # layers 0-4 keep RoPE, 5-15 get fresh positioners
# OLMo-2-0425-1B's shape, as its config.json gives it (loading checks they agree; --dry_run and a
# run without the checkpoint use them)
n_layer = 16
n_head = 16
n_embd = 2048
intermediate_size = 8192
vocab_size = 100352
rope_theta = 500000.0

block_size = 4096
batch_size = 2                      # sequences per GPU and micro-step; the authors' 4 (on 4 x H100, FSDP)
                                    # fits 8 x H100 with --fsdp=True but not with DDP (--dry_run)
gradient_accumulation_steps = 256   # x 2 = 512 sequences x 4096 = 2,097,152 tokens per step
max_iters = 23852                   # OLMo's stop_at: 50e9 tokens / 2,097,152 rounded up, + 10
lr_decay_iters = 23842              # linear to zero here; the last 10 steps run at min_lr = 0

learning_rate = 7.4487e-5
min_lr = 0.0
lr_schedule = "linear"
warmup_iters = 200                  # the authors: 0, with stage 1's Adam moments loaded. Here the moments
                                    # start at zero and step 1 moves every weight by ~lr * sign(g):
                                    # 200 steps (0.8% of the run) ramp over that (docs/cluster.md)
weight_decay = 0.1
decay_embeddings = False            # OLMo: decay_embeddings false
decay_norms = True                  # OLMo: decay_norm_and_bias true
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 1.0
z_loss = 1e-5                       # OLMo's softmax_auxiliary_loss, multiplier 1e-5

dtype = "bfloat16"
compile = True
seed = 42
eval_interval = 1000
eval_iters = 50
ckpt_interval = 1000
keep_ckpts = 3                      # the latest three, as the authors keep (hard links: no extra copy)
log_interval = 10
