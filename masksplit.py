r"""MaskSplit: cut a saliency mask into a support half and a query half (paper section 3.2, Figure 3).

One file needing only numpy and torch: copy it into your project. Everything works on numpy arrays and torch
tensors (CPU or CUDA), on one mask [H, W] or a batch [B, H, W]; any nonzero value is foreground.

Geometry of a vertical split ("Vsplit"), with c[x] the foreground count of column x and T the total:

    median column m = smallest x with cumsum(c)[x] >= T / 2

          x = m+s
      y=0 ----\--------      The line runs from (m + shift, 0) to (m - shift, H - 1).
              |\             Foreground strictly right of it is the right half, every other
        left  | \  right     foreground pixel is the left half, so each foreground pixel is in
        half  |  \ half      exactly one half (shift 0: the split is at the median column).
              |   \          swap=False: support = right, query = left (the paper's assignment).
    y=H-1 -----\---\----
              x = m-s

A horizontal split ("Hsplit") is the vertical split of the transposed mask: support = below the line (swap=False).
line="official" follows the authors' public code, which differs from the paper: its line runs from
(m - 3*shift, top) to (m - shift, bottom) and pixels exactly on the line belong to neither half.
The query loss ignores the support half (section 3.2, last paragraph): `query_target` marks it with
`ignore_index`, so `F.cross_entropy(logits, target, ignore_index=255)` never pushes it to background.

    >>> ms = MaskSplit()                                  # paper defaults: Vsplit, slope 40, alternate
    >>> support_fg, query_fg = ms(mask, generator=torch.Generator().manual_seed(0))
    >>> target = query_target(query_fg, support_fg)       # 1 query fg, 255 support fg, 0 background
"""
import numpy as np
import torch

DIRECTIONS = ("vertical", "horizontal")
LINES = ("paper", "official")


def _as_torch(mask):
    """Return (foreground bool tensor, whether the input was numpy)."""
    if isinstance(mask, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(mask if mask.dtype == np.bool_ else mask != 0)), True
    if isinstance(mask, torch.Tensor):
        return (mask if mask.dtype == torch.bool else mask != 0).contiguous(), False
    raise TypeError(f"mask must be a numpy array or a torch tensor, got {type(mask).__name__}")


def _per_item(value, batch, name, device):
    """A scalar or one value per batch item -> int64 tensor [B, 1, 1]."""
    value = torch.as_tensor(value).to(device=device, dtype=torch.int64).reshape(-1)
    if value.numel() == 1:
        value = value.expand(batch)
    if value.numel() != batch:
        raise ValueError(f"{name} has {value.numel()} values for a batch of {batch} masks")
    return value.view(batch, 1, 1)


def _halves(fg, direction, shift, swap, line):
    """(support, query) halves of fg [B, H, W]; shift and swap are int64 / bool tensors [B, 1, 1]."""
    if direction == "horizontal":  # Hsplit: the Vsplit of the transposed mask
        support, query = _halves(fg.transpose(1, 2), "vertical", shift, swap, line)
        return support.transpose(1, 2).contiguous(), query.transpose(1, 2).contiguous()
    height, width = fg.shape[1:]
    # the median column m: the smallest x with cumsum(c)[x] >= T / 2, in integers 2 * cumsum(c)[x] >= T
    cumulative = fg.sum(dim=1).cumsum(dim=1)                     # cumsum(c), c[x] = foreground of column x, [B, W]
    m = (2 * cumulative >= cumulative[:, -1:]).int().argmax(dim=1).view(-1, 1, 1)
    x, y = torch.arange(width, device=fg.device).view(1, 1, width), torch.arange(height, device=fg.device)[:, None]
    span = max(height - 1, 1)                                                     # H - 1
    if line == "paper":
        # the line from (m + s, 0) to (m - s, H - 1): x_line(y) = m + s - 2 s y / (H - 1); multiplied by H - 1,
        # every pixel compares in integers. Right: x > x_line; left: every other foreground pixel.
        line_x = (m + shift) * span - 2 * shift * y
        right = x * span > line_x
        left = ~right
    else:
        # official: from (m - 3 s, top) to (m - s, bottom); pixels exactly on the line are in neither half
        line_x = (m - 3 * shift) * span + 2 * shift * y
        right, left = x * span > line_x, x * span < line_x
    # the paper's assignment: support = right, query = left; swapped (alternate): the other way round
    halves = torch.stack([fg & right, fg & left])                                # [2, B, H, W]
    item, swapped = torch.arange(len(fg), device=fg.device), swap.view(-1).long()
    return halves[swapped, item], halves[1 - swapped, item]


def split_mask(mask, direction="vertical", shift=0, swap=False, line="paper"):
    """Deterministic MaskSplit of `mask` ([H, W] or [B, H, W]) -> (support_fg, query_fg), boolean masks of the
    input's library, shape and device. `shift` (pixels, section 3.2 "slope") and `swap` (section 3.2
    "alternate") are scalars or, for a batch, one value per item."""
    if direction not in DIRECTIONS or line not in LINES:
        raise ValueError(f"direction must be one of {DIRECTIONS} and line one of {LINES}, got {direction!r}, {line!r}")
    fg, from_numpy = _as_torch(mask)
    if fg.dim() not in (2, 3):
        raise ValueError(f"mask must be [H, W] or [B, H, W], got shape {tuple(fg.shape)}")
    batch = fg.view(-1, *fg.shape[-2:])
    shift, swap = (_per_item(v, len(batch), name, fg.device) for v, name in ((shift, "shift"), (swap, "swap")))
    support, query = _halves(batch, direction, shift, swap.bool(), line)
    support, query = support.view(fg.shape), query.view(fg.shape)
    return (support.numpy(), query.numpy()) if from_numpy else (support, query)


def query_target(query_fg, support_fg, ignore_index=255):
    """The query's training target (section 3.2): 1 on the query foreground, `ignore_index` on the support
    foreground not also query (as in "no split"), 0 elsewhere. int64 for torch, uint8 for numpy."""
    if isinstance(query_fg, np.ndarray):
        if not 0 <= ignore_index <= 255:
            raise ValueError(f"ignore_index {ignore_index} does not fit the uint8 target of a numpy mask")
        target = np.where(support_fg != 0, ignore_index, 0).astype(np.uint8)
        target[query_fg != 0] = 1
        return target
    target = torch.where(support_fg != 0, ignore_index, 0).to(torch.int64)
    return target.masked_fill(query_fg != 0, 1)


def _draw(generator, low=None, high=None):
    """A uniform number in [0, 1), or integer in [low, high], from a numpy or torch Generator (None: torch's)."""
    if isinstance(generator, np.random.Generator):
        return float(generator.random()) if low is None else int(generator.integers(low, high + 1))
    if low is None:
        return float(torch.rand((), generator=generator))
    return int(torch.randint(low, high + 1, (), generator=generator))


class MaskSplit:
    """The random episode maker of section 3.2: `ms(mask, generator) -> (support_fg, query_fg)`.

    direction: "vertical" (Vsplit, paper default), "horizontal" (Hsplit) or "mixed" (MixedSplit, 1/2 each).
    max_shift: the slope; shift is uniform in [-max_shift, max_shift] pixels (paper: 40; 0 = "without slope").
    alternate: a fair coin picks which side is the support (paper: on); off = support is always right/bottom.
    prob: probability of splitting at all; otherwise support = query = whole mask (Table 1's "prob").
    min_pixels: both halves need this many pixels; otherwise redraw up to `max_tries` times, then no split.
    line: "paper" or "official" (the authors' code; see the module docstring).
    """

    def __init__(self, direction="vertical", max_shift=40, alternate=True, prob=1.0, min_pixels=512,
                 line="paper", max_tries=10):
        if direction not in DIRECTIONS + ("mixed",):
            raise ValueError(f"direction must be vertical, horizontal or mixed, got {direction!r}")
        if line not in LINES:
            raise ValueError(f"line must be one of {LINES}, got {line!r}")
        if not 0.0 <= prob <= 1.0 or max_shift < 0 or min_pixels < 0 or max_tries < 1:
            raise ValueError(f"MaskSplit needs prob in [0, 1], max_shift and min_pixels >= 0 and max_tries >= 1, got "
                             f"{prob}, {max_shift}, {min_pixels} and {max_tries}")
        self.direction, self.max_shift, self.alternate = direction, int(max_shift), bool(alternate)
        self.prob, self.min_pixels, self.line, self.max_tries = float(prob), int(min_pixels), line, int(max_tries)

    def __call__(self, mask, generator=None):
        return self.sample(mask, generator)[:2]

    def sample(self, mask, generator=None):
        """Like calling the object, and also returns what was drawn: a dict {"direction", "shift", "swap"}
        (None when the mask was not split), or a list of them for a batch."""
        fg, _ = _as_torch(mask)
        if fg.dim() == 3:
            items = [self.sample(m, generator) for m in mask]
            stack = np.stack if isinstance(mask, np.ndarray) else torch.stack
            return stack([s for s, _, _ in items]), stack([q for _, q, _ in items]), [p for _, _, p in items]
        if fg.dim() != 2:
            raise ValueError(f"mask must be [H, W] or [B, H, W], got shape {tuple(fg.shape)}")
        if not fg.any():
            raise ValueError("MaskSplit got an all-empty mask: there is no foreground to split")
        if generator is not None and not isinstance(generator, (np.random.Generator, torch.Generator)):
            raise TypeError(f"generator must be numpy.random.Generator or torch.Generator, got {type(generator)}")
        if _draw(generator) < self.prob:
            for _ in range(self.max_tries):
                direction = self.direction if self.direction != "mixed" else DIRECTIONS[int(_draw(generator) < 0.5)]
                params = {"direction": direction, "shift": _draw(generator, -self.max_shift, self.max_shift),
                          "swap": self.alternate and _draw(generator) < 0.5}
                support, query = split_mask(mask, line=self.line, **params)
                if min(int(support.sum()), int(query.sum())) >= self.min_pixels:
                    return support, query, params
        whole = mask != 0
        return whole, whole.copy() if isinstance(whole, np.ndarray) else whole.clone(), None

