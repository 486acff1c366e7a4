# A from-scratch RePo model at GPT-2-small scale for cheaper ablations on one GPU or one node:
# 12 layers, d=768, 12 heads, SwiGLU 2048 (OLMo's 8/3 d), tied embeddings; with a GPT-2-sized
# vocabulary (50304) that is about 124M parameters, 8 of the 12 layers RePo (floor(12/3) = 4 RoPE).
#
#   python -m data.prepare --input=<folder of .txt/.jsonl> --name=text --tokenizer=gpt2
#   torchrun --standalone --nproc_per_node=8 train.py config/repo_124m.py              # RePo
#   torchrun --standalone --nproc_per_node=8 train.py config/repo_124m.py --pos_mode=rope --out_dir=out-rope-124m
#
# (--tokenizer=gpt2 needs tiktoken's download or cache; --tokenizer=olmo2 works offline but its
# 100352-token vocabulary makes the model ~162M parameters.)
out_dir = "out-repo-124m"
dataset = "text"

n_layer = 12
n_head = 12
n_embd = 768
intermediate_size = 2048
tie_word_embeddings = True
rope_theta = 10000.0
pos_mode = "repo"

block_size = 1024
batch_size = 16                     # per GPU and micro-step (80 GB GPUs)
gradient_accumulation_steps = 32    # x 16 x 1024 = 524,288 tokens per step
max_iters = 10000                   # ~5.2B tokens
learning_rate = 6e-4
min_lr = 6e-5
lr_schedule = "cosine"
warmup_iters = 700
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

dtype = "bfloat16"
compile = True
eval_interval = 500
eval_iters = 40
log_interval = 10
