"""A plain-PyTorch, single-process, full-batch reference of the contrastive step.

Written independently of ds_contrastive's loss: full similarity matrices, masks
built from the strings themselves, one backward over the whole global batch.
Only the chunking (which sequences share a forward call, hence a dropout
mask) and the per-chunk seed rule are taken from the engine, so that dropout
draws the same masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_contrastive.core.chunks import chunk_seed


def reference_loss(
    emb: torch.Tensor, texts: list[list[str]], scale: torch.Tensor, directions: tuple[str, ...], mask_duplicates: bool
) -> torch.Tensor:
    """Mean InfoNCE of the global batch. emb: [N, C, d]; texts: C columns of N strings."""
    n, c, _ = emb.shape
    e = F.normalize(emb, dim=-1)
    q = e[:, 0]
    docs = torch.cat([e[:, k] for k in range(1, c)])
    doc_texts = [t for col in texts[1:] for t in col]
    q_texts = texts[0]
    i = torch.arange(n)[:, None]
    dup_doc = torch.tensor([[doc_texts[j] == doc_texts[r] and j != r for j in range(len(doc_texts))] for r in range(n)])
    dup_q = torch.tensor([[q_texts[j] == q_texts[r] and j != r for j in range(n)] for r in range(n)])
    if not mask_duplicates:
        dup_doc, dup_q = torch.zeros_like(dup_doc), torch.zeros_like(dup_q)
    own_doc = torch.arange(len(doc_texts))[None, :] % n == i
    qd = scale * q @ docs.T
    blocks = [qd.masked_fill(dup_doc, float("-inf"))]
    if "query_to_query" in directions:
        blocks.append((scale * q @ q.T).masked_fill(dup_q | torch.eye(n, dtype=torch.bool), float("-inf")))
    if "doc_to_query" in directions:
        blocks.append((scale * docs[:n] @ q.T).masked_fill(dup_q, float("-inf")))
    if "doc_to_doc" in directions:
        blocks.append((scale * docs[:n] @ docs.T).masked_fill(dup_doc | own_doc, float("-inf")))
    logits = torch.cat(blocks, dim=1)
    return (torch.logsumexp(logits, dim=1) - qd[torch.arange(n), torch.arange(n)]).mean()


def reference_embeddings(model, tokenizer, shards, plans, seed: int, step: int, max_length: int) -> torch.Tensor:
    """[N, C, d] embeddings with grad, each rank's chunks run under that rank's chunk seeds."""
    per_rank = []
    for rank, (shard, plan) in enumerate(zip(shards, plans)):
        flat = [t for col in shard for t in col]
        rows, cols = len(shard[0]), len(shard)
        out: list[torch.Tensor | None] = [None] * len(flat)
        for c, (indices, dummy) in enumerate(plan):
            if dummy:
                continue
            feats = tokenizer([flat[i] for i in indices], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(chunk_seed(seed, step, rank, c))
                emb = model(dict(feats))["sentence_embedding"]
            for k, i in enumerate(indices):
                out[i] = emb[k]
        per_rank.append(torch.stack(out).view(cols, rows, -1).transpose(0, 1))
    return torch.cat(per_rank)


def param_groups(params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [p for _, p in params if p.ndim >= 2]
    rest = [p for _, p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def reference_guided_loss(emb: torch.Tensor, guide: torch.Tensor, texts: list[list[str]], scale: torch.Tensor,
                          strategy: str, margin: float, contrast_anchors: bool, contrast_positives: bool
                          ) -> torch.Tensor:
    """Mean guided (GIST) loss of the global batch; emb [N, C, d], guide [N, C, dg] (no grad)."""
    n, c, _ = emb.shape
    e, g = F.normalize(emb, dim=-1), F.normalize(guide, dim=-1)
    q, gq = e[:, 0], g[:, 0]
    docs, gdocs = torch.cat([e[:, k] for k in range(1, c)]), torch.cat([g[:, k] for k in range(1, c)])
    p, gp = docs[:n], gdocs[:n]
    doc_texts = [t for col in texts[1:] for t in col]
    dup_doc = torch.tensor([[doc_texts[j] == doc_texts[r] and j != r for j in range(len(doc_texts))] for r in range(n)])
    dup_q = torch.tensor([[texts[0][j] == texts[0][r] and j != r for j in range(n)] for r in range(n)])
    pos_sim = (gq * gp).sum(-1, keepdim=True)
    threshold = pos_sim - (pos_sim.abs() * margin if strategy == "relative" else margin)
    eye = torch.zeros(n, len(doc_texts), dtype=torch.bool)
    eye[torch.arange(n), torch.arange(n)] = True
    blocks = [(scale * q @ docs.T).masked_fill(((gq @ gdocs.T > threshold) & ~eye) | dup_doc, float("-inf"))]
    if contrast_anchors:
        blocks.append((scale * q @ q.T).masked_fill((gq @ gq.T > threshold) | dup_q, float("-inf")))
    if contrast_positives:
        blocks.append((scale * p @ p.T).masked_fill((gp @ gp.T > threshold) | dup_doc[:, :n], float("-inf")))
    logits = torch.cat(blocks, dim=1)
    return (torch.logsumexp(logits, dim=1) - scale * (q * p).sum(-1)).mean()


def reference_guide_embeddings(guide, texts: list[list[str]], max_length: int) -> torch.Tensor:
    """[N, C, dg] guide embeddings of every column, from the guide's own tokenizer (no grad)."""
    with torch.no_grad():
        cols = [guide(dict(guide.tokenizer(col, padding=True, truncation=True, max_length=max_length,
                                           return_tensors="pt")))["sentence_embedding"] for col in texts]
    return torch.stack(cols, dim=1)


def zero_fill_grads(params: list[tuple[str, torch.nn.Parameter]]) -> None:
    """Give unused parameters (BERT's pooler under mean pooling) a zero gradient, as DeepSpeed does.

    torch optimizers skip a parameter whose grad is None, DeepSpeed hands them a
    zero gradient, so weight decay still applies to them; the reference follows.
    """
    for _, p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
