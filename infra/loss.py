"""
The training loss from the final hidden states: cross-entropy over the vocabulary (plus OLMo's
z-loss in the gradient), with the LM head's logits formed and reduced one chunk of rows at a time,
so a 100K-token vocabulary never materialises a [tokens, vocab] tensor. GPT.forward(idx, targets)
calls lm_loss; infra/memory.py counts its chunk in the memory plan.
"""
import torch

LOSS_CHUNK_LOGITS = 1 << 25  # logits per chunk (128 MiB in float32); 334 tokens at OLMo-2's vocabulary


class _ChunkedLMLoss(torch.autograd.Function):
    """(sum of cross-entropies, sum of logsumexp^2) over the rows of h (given in the matmul dtype),
    with logits = h W^T formed `chunk` rows at a time and reduced in float32 (float64 for float64).
    Backward recomputes each chunk's logits, so no [tokens, vocab] tensor is ever stored: only h,
    the targets and one float per row (its logsumexp) are saved."""

    @staticmethod
    def forward(ctx, h, weight, targets, dtype, chunk):
        ct = torch.promote_types(dtype, torch.float32)
        w = weight.to(dtype)
        lse = torch.empty(h.shape[0], dtype=ct, device=h.device)
        picked = torch.empty_like(lse)
        for i in range(0, h.shape[0], chunk):
            logits = (h[i:i + chunk] @ w.t()).to(ct)
            lse[i:i + chunk] = torch.logsumexp(logits, dim=-1)
            picked[i:i + chunk] = logits.gather(1, targets[i:i + chunk].clamp(min=0)[:, None])[:, 0]
        # the outputs are fresh reductions, never a buffer filled in place: torch 2.11's dynamo drops
        # the gradient of an autograd.Function output that was mutated in place or aliases another tensor
        valid = targets != -1
        ce = ((lse - picked) * valid).sum()
        z = (lse.square() * valid).sum()
        # one chunk holds all the logits: keep them (no more memory than a chunk takes anyway) rather
        # than recompute them, which on a small model would cost a second LM-head matmul per step
        ctx.logits = logits if h.shape[0] <= chunk else None
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.dtype, ctx.chunk = dtype, chunk
        return ce, z

    @staticmethod
    def backward(ctx, g_ce, g_z):
        # by blocks of the vocabulary, each over all rows: dW's rows of a block come from one matmul
        # and are written once, into the gradient itself (row chunks would each add a full [V, d]
        # product into an accumulator: three [V, d] temporaries). The softmax of a block needs only
        # the row's logsumexp, saved by forward. A block holds as many logits as a forward chunk.
        h, weight, targets, lse = ctx.saved_tensors
        dtype, ct = ctx.dtype, lse.dtype
        N, V = h.shape[0], weight.shape[0]
        block = max(1, ctx.chunk * V // max(N, 1))
        valid = (targets != -1).to(ct)
        # d/dlogits of ce_row = softmax - onehot; of lse_row^2 = 2 lse_row softmax
        scale = (valid * (g_ce + 2 * g_z * lse))[:, None]
        rows = torch.arange(N, device=h.device)
        dh = torch.zeros(h.shape, dtype=ct, device=h.device)  # a sum over blocks: kept in float32 at least
        dw = torch.empty_like(weight)
        for v in range(0, V, block):
            w = weight[v:v + block].to(dtype)
            if ctx.logits is not None:  # kept by forward: not overwritten (backward may run again)
                grad = (ctx.logits[:, v:v + block] - lse[:, None]).exp_().mul_(scale)
            else:  # softmax in place: one block of logits at a time
                grad = (h @ w.t()).to(ct).sub_(lse[:, None]).exp_().mul_(scale)
            hit = (targets >= v) & (targets < v + w.shape[0])  # rows whose target lies in this block
            grad[rows, (targets - v).clamp(0, w.shape[0] - 1)] -= valid * g_ce * hit
            grad = grad.to(dtype)
            if dw.dtype == dtype:  # no [block, d] temporary where none is needed
                torch.mm(grad.t(), h, out=dw[v:v + block])
            else:
                dw[v:v + block] = grad.t() @ h
            if dh.dtype == dtype:
                torch.addmm(dh, grad, w, out=dh)  # addmm_ in effect; the FLOP counter counts this form
            else:
                dh += grad @ w
            del grad, w  # before the next block is formed, not after: one block alive at a time
        return dh.to(h.dtype), dw, None, None, None


def lm_loss(h, weight, targets, z_loss=0.0, chunk=None):
    """Mean cross-entropy of the logits h @ weight.T against targets (-1 = ignored), the LM head
    recomputed in backward instead of stored (_ChunkedLMLoss). With z_loss > 0 the gradient also
    carries OLMo's z-loss, z_loss * mean(logsumexp(logits)^2) over the same tokens, added as a term
    that is zero in value: the returned number is always the plain cross-entropy.

    h [N, d], weight [V, d], targets [N]. The matmul runs in autocast's dtype when autocast is on
    (as nn.Linear would), else in h's; the softmax and the sums in float32 at least."""
    if not h.shape[0]:
        raise ValueError("lm_loss of no tokens: give at least one")
    kind = h.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
    chunk = chunk or max(1, LOSS_CHUNK_LOGITS // weight.shape[0])
    with torch.autocast(kind, enabled=False):  # h is cast (and saved) in the matmul dtype, as nn.Linear would
        ce, z = _ChunkedLMLoss.apply(h.to(dtype), weight, targets, dtype, chunk)
    n = (targets != -1).sum()
    loss = ce / n
    if z_loss:
        z = z / n
        loss = loss + z_loss * (z - z.detach())
    return loss
