"""Foreground masks of the reference images, found with no extra model (ALGORITHM.md §2).

Where it sits in DRP-Diff: while a reference image is DDIM-inverted (`sampling.invert`), a hook
records two attention statistics of the UNet:

- `C`: how strongly each 16×16 token attends to the subject word of the caption (cross-attention,
  averaged over heads, layers and steps, min–max normalised) — *where* the subject is, coarsely;
- `S`: the self-attention probabilities of one 32×32 layer (N × N, N = 1024 at 512 px) — row i says
  which tokens token i looks like, so tokens of one object have similar rows.

Clustering the rows of `S` cuts the image into a few coherent segments; `C` then says which segments
are the subject. Without a subject word, segments that hug the image border are taken as background.
The dual-reference attention (`dual_reference.py`) gathers the reference tokens selected by these
masks, so the masks are kept at image resolution and resized to each attention grid (64, 32, 16 at
512 px) with `resize_mask`.

The idea of clustering self-attention rows follows DiffSegmenter / "Diffuse, Attend, and Segment"
(https://arxiv.org/abs/2308.12469); the rules and constants are this project's (ALGORITHM.md §2).
"""

import torch
import torch.nn.functional as F

DEGENERATE_MAX = 0.90  # one cluster holding > 90 % of the tokens: the clustering found no structure
DEGENERATE_MIN = 0.02  # a cluster under 2 % of the tokens: k-means split noise, its segments are not trusted


def kmeans(x, k=5, seed=0, iters=50, init=None):
    """Lloyd's k-means on the rows of x (N, D) -> labels (N,) long, numbered by first appearance.

    k-means++ seeding (https://dl.acm.org/doi/10.5555/1283383.1283494) from a private generator, in
    float64 on the CPU: the labels depend only on (x, k, seed), not on the global RNG, the device or
    the thread count. `init` (k, D) gives the starting centres instead. An empty cluster is moved to
    the point farthest from its centre.
    """
    x = x.detach().to("cpu", torch.float64).flatten(1)
    n = x.shape[0]
    k = max(1, min(k, n))
    g = torch.Generator().manual_seed(seed)

    def sq_dist(centres):  # (N, k) squared Euclidean distances
        d = (x * x).sum(1, keepdim=True) - 2 * x @ centres.T + (centres * centres).sum(1)[None]
        return d.clamp(min=0)

    if init is not None:
        centres = init.detach().to("cpu", torch.float64).flatten(1)
    else:  # k-means++: the first centre uniformly, each next one with probability ∝ squared distance to the nearest
        centres = x[torch.randint(n, (1,), generator=g)]
        for _ in range(1, k):
            d2 = sq_dist(centres).min(1).values
            i = torch.multinomial(d2, 1, generator=g) if d2.sum() > 0 else torch.zeros(1, dtype=torch.long)
            centres = torch.cat([centres, x[i]])  # all points already covered: a duplicate (it stays empty)
    k = centres.shape[0]

    labels = None
    for _ in range(iters):
        d = sq_dist(centres)
        new = d.argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        far = d.gather(1, labels[:, None]).squeeze(1)  # each point's distance to its own centre
        for j in (counts == 0).nonzero().flatten().tolist():
            i = far.argmax()
            if far[i] <= 0:
                break  # every point sits on a centre: nothing to move an empty cluster to
            centres[j], far[i] = x[i], 0
    labels = sq_dist(centres).argmin(1)

    # Renumber clusters in order of their first token, so equal partitions get equal labels.
    first = torch.full((k,), n, dtype=torch.long).scatter_reduce(0, labels, torch.arange(n), "amin")
    rank = torch.empty(k, dtype=torch.long)
    rank[first.argsort(stable=True)] = torch.arange(k)
    return rank[labels]


def normalise(m):
    """Min–max normalise to [0, 1]; a constant map (no information) becomes all zeros."""
    m = m if m.is_floating_point() else m.float()
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def border(h, w, device=None):
    """(h, w) bool map of the tokens on the outermost rows and columns."""
    b = torch.zeros(h, w, dtype=torch.bool, device=device)
    b[0], b[-1], b[:, 0], b[:, -1] = True, True, True, True
    return b


def foreground_mask(cross, self_attn, grid, k=5, seed=0, ratio=1.4, threshold=0.3):
    """The foreground of a reference at the token grid of `self_attn` -> (bool mask (h, w), rule used).

    cross: C, the subject's cross-attention map at any grid (h', w'), or None with no subject word.
    self_attn: S (N, N), N = h·w. The rule that decided is returned as "kmeans", "cross-threshold"
    (degenerate clustering), "border" (no subject) or "all-foreground" (degenerate and no subject).
    A flat C (all values equal) counts as no subject. k = 5, ratio = 1.4 and threshold = 0.3 are the
    defaults of ALGORITHM.md §2: a handful of segments (subject, ground, sky, …), kept when they score
    clearly above the rest.
    """
    h, w = grid
    n = h * w
    if tuple(self_attn.shape) != (n, n):
        raise ValueError(f"self_attn must be ({n}, {n}) for a {h}×{w} grid, got {tuple(self_attn.shape)}")
    device = self_attn.device
    if cross is not None and cross.max() <= cross.min():
        cross = None  # a flat map says nothing about where the subject is: treat it as no subject

    labels = kmeans(self_attn, k, seed)  # (N,) on the CPU
    k = int(min(k, n))
    counts = torch.bincount(labels, minlength=k).double()
    degenerate = counts.max() > DEGENERATE_MAX * n or counts.min() < DEGENERATE_MIN * n

    if cross is not None:
        c = normalise(cross.detach().to("cpu", torch.float64))
        c = F.interpolate(c[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        if degenerate:
            return (c >= threshold).to(device), "cross-threshold"
        # Score = mean C over the cluster; keep clusters well above the others, and always the best one.
        score = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, c.flatten()) / counts
        others = (score.sum() - score) / (k - 1)  # per cluster: the mean score of the other clusters
        keep = score > ratio * others
        keep[score.argmax()] = True
    else:
        if degenerate:
            return torch.ones(h, w, dtype=torch.bool, device=device), "all-foreground"
        # A cluster is background when more of its tokens lie on the border than of the grid's tokens.
        on_border = border(h, w).flatten().double()
        share = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, on_border) / counts
        keep = share <= on_border.mean()
        if not keep.any():
            keep[share.argmin()] = True
    return keep[labels].view(h, w).to(device), "kmeans" if cross is not None else "border"


def resize_mask(mask, hw):
    """A 0/1 mask (H, W) -> float (h, w) of 0/1 by area averaging, then ≥ 0.5 is foreground.

    Shrinking averages the pixels under each output cell (adaptive average pooling is area
    interpolation, also for non-integer ratios); growing repeats pixels (area == nearest there).
    Each axis is handled on its own, so a mask may shrink in one and grow in the other.
    """
    h, w = hw
    m = mask.detach().float()[None, None]  # (1, 1, H, W)
    H, W = m.shape[-2:]
    m = F.adaptive_avg_pool2d(m, (min(h, H), min(w, W)))
    if (h, w) != tuple(m.shape[-2:]):
        m = F.interpolate(m, size=(h, w), mode="nearest-exact")
    return (m[0, 0] >= 0.5).float()


def upsample_mask(mask, hw):
    """A mask at a token grid -> float (h, w) of 0/1 at a larger size (image resolution), nearest."""
    if hw[0] < mask.shape[-2] or hw[1] < mask.shape[-1]:
        raise ValueError(f"upsample_mask grows masks; {tuple(mask.shape)} -> {tuple(hw)} shrinks (use resize_mask)")
    return resize_mask(mask, hw)
