"""
Sample text from a trained model, and show the positions its RePo layers give the prompt.

    python sample.py --ckpt=out --prompt="The list type" --max_new_tokens=100
    python sample.py --ckpt=out --prompt="x = [1, 2, 3]" --positions=true --max_new_tokens=0
    python sample.py --help                                  # every option and its default

--ckpt is a train.py out_dir (its hf/ export, written when the run finishes) or any Hugging Face
OLMo-2 / RePo directory, as for eval.py. Tokens are drawn one at a time with the KV cache
(GPT.generate): the logits are divided by --temperature (0 = greedy) and cut to the --top_k most
likely tokens (0 = all); --seed makes the sample repeatable. --positions=true prints, for every
RePo layer, the real-valued position f_phi gave each prompt token in each head (RoPE would give
token t the position t). Bad input is one `error:` line and exit code 2.
"""

import torch

import cli
from infra.model_dir import EvalError, check_device, check_length_fits, inspect_ckpt
from model import GPT

OPTIONS = {  # option: (default, what it is)
    "ckpt": ("out", "a train.py out_dir or an HF checkpoint dir"),
    "prompt": ("", "text to continue; empty starts a new document (<|endoftext|>)"),
    "max_new_tokens": (200, "tokens to generate"),
    "temperature": (0.8, "divides the logits; 0 = greedy (always the most likely token)"),
    "top_k": (50, "sample among the k most likely tokens; 0 = all"),
    "seed": (1337, "torch seed: the same seed gives the same sample"),
    "positions": (False, "print the learned positions of the prompt's tokens per RePo layer and head"),
    "device": ("cpu", "cpu, cuda or cuda:N"),
}
DEFAULTS = {k: v[0] for k, v in OPTIONS.items()}


def options(argv) -> dict:
    args = {**DEFAULTS, **cli.parse(argv, DEFAULTS, error=EvalError)}
    for key in ("max_new_tokens", "temperature", "top_k"):
        if args[key] < 0:
            raise EvalError(f"--{key} must be at least 0, got {args[key]}")
    check_device(args["device"])
    return args


def positions_table(model, enc, idx) -> str:
    """The learned position of every prompt token, one block per RePo layer, one column per head."""
    modes = model.config.layer_modes()
    repo = [i for i, m in enumerate(modes) if m == "repo"]
    if not repo:
        return f"no RePo layers (layer modes {','.join(modes)}): every token t has position t or none"
    with torch.no_grad():
        _, _, pos = model(idx, return_positions=True)  # [n_layer, 1, n_head, T]
    tokens = [enc.decode_single_token_bytes(t).decode("utf-8", "replace") for t in idx[0].tolist()]
    width = max(12, max(len(repr(t)) for t in tokens) + 2)
    lines = []
    for layer in repo:
        z = pos[layer, 0].cpu()  # [n_head, T]
        lines.append(f"layer {layer} (repo): position of each prompt token per head")
        lines.append("  " + "token".ljust(width) + "".join(f"{f'head {h}':>10}" for h in range(z.shape[0])))
        for t, tok in enumerate(tokens):
            lines.append("  " + repr(tok).ljust(width) + "".join(f"{float(z[h, t]):10.4f}" for h in range(z.shape[0])))
    return "\n".join(lines)


def main(argv) -> str:
    """Print (and return) the sample: the prompt and its continuation."""
    args = options(argv)
    device = torch.device(args["device"])
    info = inspect_ckpt(args["ckpt"], val_data="none")
    model = GPT.from_pretrained(info["hf_dir"]).to(device).eval()
    enc = info["enc"]
    prompt = enc.encode_ordinary(args["prompt"]) if args["prompt"] else [enc.eot_token]
    idx = torch.tensor([prompt], device=device)
    check_length_fits(model, len(prompt) + args["max_new_tokens"], device, "lower --max_new_tokens")  # the KV cache
    if args["positions"]:
        print(positions_table(model, enc, idx))
    torch.manual_seed(args["seed"])
    out = model.generate(idx, args["max_new_tokens"], temperature=args["temperature"], top_k=args["top_k"] or None)
    text = enc.decode([t for t in out[0].tolist() if t < enc.n_vocab])  # padded ids are never trained
    print(f"----- {info['hf_dir']}: {args['max_new_tokens']} tokens, temperature {args['temperature']}, "
          f"top-k {args['top_k'] or 'all'}, seed {args['seed']} -----\n{text}\n-----")
    return text


if __name__ == "__main__":
    cli.run(main, cli.usage(__doc__, OPTIONS), errors=(EvalError, ValueError, OSError, MemoryError))
