"""The contrastive loss core: log-sum-exp over blocks of candidates, gradients in closed form.

For a tile of rows and one *term* (the rows' anchors or positives against a
set of candidates: documents, anchors or positives), the logits of a block of
candidates are one matrix product. Pass 1 runs over the blocks with a
streaming (online) log-sum-exp; pass 2 turns each block into softmax minus
target, ``G``, and takes its two gradient products, ``G @ candidates`` and
``G.T @ rows``. Nothing batch-wide is built: memory is one tile x block of
logits (kept from pass 1 for pass 2 when the tile's logits fit ``tile_elements``,
recomputed otherwise), and no autograd graph runs through the logits.

Masks are sparse where they are few: the (row, candidate) pairs whose texts are
equal (duplicates, found by sorting the hashes) and a row's own candidates.
When a batch repeats texts so often that the pairs would outgrow
``PAIRS_PER_CANDIDATE`` per candidate (a label-like positive shared by
thousands of rows), duplicates are instead found per block by comparing the
hashes, like the old dense masks. A guide's masks (guided losses) are dense
and computed per block from the guide's similarities, in fp32 whatever the
``precision`` (a mask is a decision, not a sum).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
PAIRS_PER_CANDIDATE = 16  # duplicate pairs beyond this many per candidate: compared per block instead


def equal_pairs(row_hash: torch.Tensor, col_hash: torch.Tensor, skip_own: bool
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every (i, j) with ``col_hash[j] == row_hash[i]`` (``skip_own``: j != i), sorted by i then j.

    Sorting groups equal hashes in O((rows + cols) log cols); only the pairs
    that collide are listed (a few per batch), never a rows x cols comparison.
    None when there would be more than ``PAIRS_PER_CANDIDATE`` per candidate.
    """
    values, order = torch.sort(col_hash, stable=True)
    row_hash = row_hash.contiguous()
    left = torch.searchsorted(values, row_hash, side="left")
    counts = torch.searchsorted(values, row_hash, side="right") - left
    if int(counts.sum()) > PAIRS_PER_CANDIDATE * len(col_hash) + len(row_hash):
        return None
    rows = torch.repeat_interleave(torch.arange(len(row_hash), device=row_hash.device), counts)
    starts = torch.repeat_interleave(left - (torch.cumsum(counts, 0) - counts), counts)
    cols = order[starts + torch.arange(len(rows), device=row_hash.device)]
    if skip_own:
        rows, cols = rows[cols != rows], cols[cols != rows]
    key = rows * len(col_hash) + cols
    key = torch.sort(key).values
    return key // len(col_hash), key % len(col_hash)


def union_pairs(*pairs: tuple[torch.Tensor, torch.Tensor], cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of several (rows, cols) pair lists over a ``cols``-wide term, sorted by row, each pair once."""
    key = torch.unique(torch.cat([r * cols + c for r, c in pairs]))
    return key // cols, key % cols


@dataclass
class Term:
    """One set of candidates of every row: ``rows[i]`` against each of ``cands``.

    ``rows`` and ``cands`` are views of the queries or documents (their
    gradients go to ``row_grad`` / ``cand_grad``, views of the same buffers).
    ``masked``: sparse (row, candidate) pairs that are no candidate (sorted by
    row; duplicates, the row's own). ``same``: instead of listing duplicates,
    the (row, candidate) hashes compared per block (j != i). A guided term also
    has the guide's embeddings of both sides; a candidate the guide scores
    above the row's threshold is masked too, except the positive.
    """

    name: str
    rows: torch.Tensor
    cands: torch.Tensor
    row_grad: torch.Tensor
    cand_grad: torch.Tensor
    masked: tuple[torch.Tensor, torch.Tensor]
    same: tuple[torch.Tensor, torch.Tensor] | None = None
    guide_rows: torch.Tensor | None = None
    guide_cands: torch.Tensor | None = None
    protect_positive: bool = False


@contextlib.contextmanager
def cuda_matmuls(mode: str) -> Iterator[None]:
    """CUDA's fp32 products in ``mode`` ("tf32" or "ieee") inside, the process's setting restored after."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; mixing it with allow_tf32 raises
        previous, matmul.fp32_precision = matmul.fp32_precision, mode
    else:
        previous, matmul.allow_tf32 = matmul.allow_tf32, mode == "tf32"
    try:
        yield
    finally:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = previous
        else:
            matmul.allow_tf32 = previous


def low(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16: bf16 on CUDA; on a CPU, the rounded values in fp32 (its kernels have no fp32 output)."""
    return t.bfloat16() if t.device.type == "cuda" else t.bfloat16().float()


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result; bf16 inputs accumulate in fp32 (``torch.mm(out_dtype=)`` where torch has it)."""
    if a.dtype != torch.bfloat16:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # a torch without mm(out_dtype=): the rounded inputs, in fp32
        return a.float() @ b.float()


def tiling(width: int, tile_rows: int | None, tile_elements: int) -> tuple[int, bool, int]:
    """(rows per tile, whether a tile's logits are kept whole from pass 1 to pass 2, candidates per block).

    A row's ``width`` candidates in all; ``tile_elements`` logits at most in
    memory. Tiles of 256 to 4096 rows (as many as fit whole), so that each
    product is large enough to run at the machine's speed; when a tile's
    logits do not fit, its candidates go in blocks that do, recomputed in pass 2.
    """
    tile = tile_rows or max(256, min(4096, tile_elements // max(1, width)))
    return tile, tile * width <= tile_elements, max(1, tile_elements // tile)


def online_logsumexp(state: tuple[torch.Tensor, torch.Tensor], logits: torch.Tensor, in_place: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block of logits into a running (max, sum of exp(logit - max)) per row; -inf entries are no term.

    ``in_place``: the block is overwritten (no second block-sized buffer).
    """
    top, total = state
    new_top = torch.maximum(top, logits.max(dim=1).values)
    shift = torch.where(torch.isfinite(new_top), new_top, torch.zeros_like(new_top))  # rows with nothing yet
    shifted = torch.sub(logits, shift[:, None], out=logits if in_place else None)
    total = total * torch.exp(top - shift) + shifted.exp_().sum(dim=1)
    return new_top, total


def logsumexp_of(state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    top, total = state
    return torch.where(torch.isfinite(top), top, torch.zeros_like(top)) + torch.log(total)


class Tile:
    """A tile of rows (``span`` of the global rows; ``idx`` the same as a tensor) and what its first term shows.

    The first term holds the positives (row i's candidate i): the positive's
    logit, the hardest other candidate (its logit and column: the first of
    equal ones, as ``argmax`` picks), seen block by block, and, once known,
    each group's log-sum-exp (``lse``).
    """

    def __init__(self, start: int, stop: int, device: torch.device) -> None:
        self.span = slice(start, stop)
        idx = torch.arange(start, stop, device=device)
        self.idx = idx
        self.positive = torch.empty(len(idx), device=idx.device)
        self.hardest = torch.full((len(idx),), -torch.inf, device=idx.device)
        self.hardest_col = torch.zeros(len(idx), dtype=torch.long, device=idx.device)
        self.lse: list[torch.Tensor] = []
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def inside(self, c0: int, c1: int) -> tuple[int, int]:
        """The global rows lo..hi of this tile whose positive is among candidates c0..c1 (on the host: no sync)."""
        lo = max(self.span.start, c0)
        return lo, max(lo, min(self.span.stop, c1))

    def positive_at(self, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile row, block column) of the positives inside candidates c0..c1."""
        lo, hi = self.inside(c0, c1)
        device = self.idx.device
        return (torch.arange(lo - self.span.start, hi - self.span.start, device=device),
                torch.arange(lo - c0, hi - c0, device=device))

    def see(self, logits: torch.Tensor, c0: int) -> torch.Tensor:
        """Read one block (candidates from c0) of the first term; returns its row maxima, the positive included."""
        at = self.positive_at(c0, c0 + logits.shape[1])
        self.positive[at[0]] = logits[at]
        logits[at] = -torch.inf
        value, col = logits.max(dim=1)
        logits[at] = self.positive[at[0]]
        better = value > self.hardest
        self.hardest = torch.where(better, value, self.hardest)
        self.hardest_col = torch.where(better, col + c0, self.hardest_col)
        lo, hi = self.inside(c0, c0 + logits.shape[1])
        rows = slice(lo - self.span.start, hi - self.span.start)
        top = value.clone()
        top[rows] = torch.maximum(value[rows], self.positive[rows])
        return top


class Core:
    """The loss of rows ``first .. first + count`` over ``terms``; accumulates gradients into the terms' buffers.

    ``joint``: one log-sum-exp over every term's candidates; else the mean
    over terms of one each. Term 0 holds the positive: row i's candidate i.
    The loss summed here is ``sum_i (lse_i - logit_ii) / n`` for the gradient;
    ``sums`` are plain sums over the rows (the metrics).
    """

    def __init__(self, terms: list[Term], n: int, scale: float, joint: bool, tile_rows: int | None,
                 tile_elements: int, precision: str, thresholds: torch.Tensor | None = None) -> None:
        self.terms, self.n, self.scale, self.joint = terms, n, scale, joint
        self.precision, self.thresholds = precision, thresholds
        self.tile, self.keep, self.block = tiling(sum(t.cands.shape[0] for t in terms), tile_rows, tile_elements)
        # bf16: each candidate matrix rounded once, not once per tile
        self.low_cands = {id(t.cands): low(t.cands) for t in terms} if precision == "bf16" else {}
        # metric sums stay on the device until the end
        self.totals: dict[str, torch.Tensor | float] = {"grad_scale": 0.0}

    def run(self, first: int, count: int) -> tuple[float, dict[str, float]]:
        """(d loss / d scale, the metric sums) of rows ``first .. first + count``; gradients into the buffers."""
        device = self.terms[0].rows.device
        tf32 = self.precision == "tf32" and device.type == "cuda"
        with cuda_matmuls("tf32") if tf32 else contextlib.nullcontext():
            for start in range(first, first + count, self.tile):
                self._tile(Tile(start, min(start + self.tile, first + count), device))
        totals = {key: float(value) for key, value in self.totals.items()}
        return totals.pop("grad_scale"), totals

    def _product(self, rows: torch.Tensor, term: Term, c0: int, c1: int, transpose: bool) -> torch.Tensor:
        """``rows @ cands[c0:c1].T`` (``transpose``) or ``rows @ cands[c0:c1]`` at the loss's precision."""
        cands = self.low_cands[id(term.cands)] if self.low_cands else term.cands
        if self.low_cands:
            rows = low(rows)
        return product(rows, cands[c0:c1].T if transpose else cands[c0:c1])

    def _guide_similarities(self, term: Term, tile: Tile, c0: int, c1: int) -> torch.Tensor:
        """The guide's similarities of the block, in fp32 whatever the precision (they decide masks)."""
        rows, cands = term.guide_rows[tile.span], term.guide_cands[c0:c1]
        if self.precision == "tf32" and rows.device.type == "cuda":
            with cuda_matmuls("ieee"):
                return rows @ cands.T
        return rows @ cands.T

    def _blocks(self, term: Term) -> list[tuple[int, int]]:
        width = term.cands.shape[0]
        step = width if self.keep else self.block
        return [(c, min(c + step, width)) for c in range(0, width, step)]

    def _logits(self, term: Term, tile: Tile, c0: int, c1: int, sums: dict | None) -> torch.Tensor:
        """Scaled logits of the tile's rows against candidates c0..c1, masked at -inf; counts into ``sums``."""
        logits = self._product(term.rows[tile.span] * self.scale, term, c0, c1, transpose=True)
        masked_count = 0
        if term.guide_rows is not None:
            guide = self._guide_similarities(term, tile, c0, c1)
            hidden = guide > self.thresholds[tile.span, None]
            if term.protect_positive:
                hidden[tile.positive_at(c0, c1)] = False
            if sums is not None:
                sums[f"masked_{term.name}"] += hidden.sum()
                sums[f"masked_similarity_{term.name}"] += (guide * hidden).sum()
                sums[f"candidates_{term.name}"] += hidden.numel()
                masked_count += hidden.sum()
            logits.masked_fill_(hidden, -torch.inf)
        r, c = self._pairs(term, tile, c0, c1)
        if sums is not None and term.guide_rows is not None:  # pairs the guide already hid count once
            masked_count -= torch.isinf(logits[r, c]).sum()
        logits[r, c] = -torch.inf
        masked_count += len(r)
        first_term = term is self.terms[0]
        if sums is not None and first_term and term.same is None:
            sums["masked_duplicates"] += len(r)  # the first term's pairs are its duplicates
        if term.same is not None:  # many duplicates: compared here; counted from the logits
            row_hash, col_hash = term.same
            same = col_hash[None, c0:c1] == row_hash[tile.span, None]
            same[tile.positive_at(c0, c1)] = False  # a row's own candidate is no duplicate of itself
            if sums is not None and first_term:
                sums["masked_duplicates"] += same.sum()
            logits.masked_fill_(same, -torch.inf)
            masked_count = torch.isinf(logits).sum()
        if sums is not None:
            sums["candidates"] += logits.numel() - masked_count
        return logits

    def _pairs(self, term: Term, tile: Tile, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sparse masked pairs inside this tile and block, as (tile row, block column)."""
        rows, cols = tile.pairs[id(term)]
        if not self.keep:  # several blocks: this one's pairs
            inside = (cols >= c0) & (cols < c1)
            rows, cols = rows[inside], cols[inside]
        return rows, cols - c0

    def _tile_pairs(self, term: Term, tile: Tile) -> tuple[torch.Tensor, torch.Tensor]:
        """The term's sparse pairs of this tile's rows, as (tile row, candidate)."""
        rows, cols = term.masked
        bounds = torch.tensor([tile.span.start, tile.span.stop], device=rows.device)
        lo, hi = torch.searchsorted(rows, bounds).tolist()
        return rows[lo:hi] - tile.span.start, cols[lo:hi]

    def _tile(self, tile: Tile) -> None:
        tile.pairs = {id(term): self._tile_pairs(term, tile) for term in self.terms}
        sums = {"candidates": 0.0, "masked_duplicates": 0.0}
        for term in self.terms:
            if term.guide_rows is not None:
                for key in ("masked_", "masked_similarity_", "candidates_"):
                    sums[key + term.name] = 0.0
        groups = [list(range(len(self.terms)))] if self.joint else [[t] for t in range(len(self.terms))]
        weight = 1.0 / self.n if self.joint else 1.0 / (self.n * len(self.terms))
        if self.keep:
            probabilities = self._kept_pass1(tile, sums, groups, weight)
        else:
            lse = self._blocked_pass1(tile, sums, groups)
        self._add_metrics(sums, torch.stack(tile.lse).mean(0), tile)
        for t, term in enumerate(self.terms):  # pass 2: softmax minus target, and the two gradient products
            for c0, c1 in self._blocks(term):
                if self.keep:
                    grad = probabilities.pop(0)
                else:
                    logits = self._logits(term, tile, c0, c1, None)
                    group = 0 if self.joint else t
                    grad = torch.sub(logits, lse[group][:, None], out=logits).exp_().mul_(weight)
                if t == 0:
                    grad[tile.positive_at(c0, c1)] -= 1.0 / self.n
                self._backward(term, tile, c0, c1, grad)

    def _kept_pass1(self, tile: Tile, sums: dict, groups: list[list[int]], weight: float) -> list[torch.Tensor]:
        """Each term's logits of the tile, whole, turned in place into ``weight x`` their softmax."""
        logits = [self._logits(term, tile, 0, term.cands.shape[0], sums) for term in self.terms]
        tops = [tile.see(logits[0], 0)] + [block.max(dim=1).values for block in logits[1:]]
        for group in groups:
            top = torch.stack([tops[t] for t in group]).amax(dim=0)
            shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            total = torch.zeros_like(shift)
            for t in group:
                total += torch.sub(logits[t], shift[:, None], out=logits[t]).exp_().sum(dim=1)
            tile.lse.append(shift + torch.log(total))
            for t in group:
                logits[t].mul_((weight / total)[:, None])
        return logits

    def _blocked_pass1(self, tile: Tile, sums: dict, groups: list[list[int]]) -> list[torch.Tensor]:
        """Each group's log-sum-exp over blocks of candidates, streamed (the logits are recomputed in pass 2)."""
        rows, device = len(tile.idx), tile.idx.device
        empty = (torch.full((rows,), -torch.inf, device=device), torch.zeros(rows, device=device))
        states = [empty for _ in groups]
        for t, term in enumerate(self.terms):
            group = 0 if self.joint else t
            for c0, c1 in self._blocks(term):
                logits = self._logits(term, tile, c0, c1, sums)
                if t == 0:
                    tile.see(logits, c0)
                states[group] = online_logsumexp(states[group], logits, in_place=True)
        tile.lse.extend(logsumexp_of(state) for state in states)
        return tile.lse

    def _backward(self, term: Term, tile: Tile, c0: int, c1: int, grad: torch.Tensor) -> None:
        """The block's two gradient products (and its share of the scale's gradient), added in place."""
        rows = term.rows[tile.span]
        toward = self._product(grad, term, c0, c1, transpose=False)
        self.totals["grad_scale"] += (toward * rows).sum()  # d logit / d scale = similarity
        term.row_grad[tile.span].add_(toward, alpha=self.scale)
        if self.low_cands:
            term.cand_grad[c0:c1].add_(product(low(grad.T), low(rows)), alpha=self.scale)
        else:  # no candidates x d temporary
            term.cand_grad[c0:c1].addmm_(grad.T, rows, alpha=self.scale)

    def _add_metrics(self, sums: dict[str, float], lse: torch.Tensor, tile: Tile) -> None:
        """Loss, top-1 (ties go to the first column, as argmax), positive and hardest-negative similarities."""
        positive, hardest, hardest_col, idx = tile.positive, tile.hardest, tile.hardest_col, tile.idx
        has_negative = torch.isfinite(hardest)
        correct = (positive > hardest) | ((positive == hardest) & (idx < hardest_col))
        sums["loss"] = (lse - positive).sum()
        sums["correct"] = correct.sum()
        sums["candidates"] -= len(idx)  # the positive is no negative
        sums["positive_similarity"] = positive.sum() / self.scale
        sums["hardest_negative_similarity"] = torch.where(has_negative, hardest, 0.0).sum() / self.scale
        sums["rows_with_negatives"] = has_negative.sum()
        for key, value in sums.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
