"""Top-B selection of the hardest candidates (step 2 of Algorithm 1 in Schmidt-Mengin et al. 2021), the hard/random
mix and the selection recall of approximate scoring."""
from typing import Optional, Sequence

import torch


def select_top_b(errors: torch.Tensor, b: int) -> torch.Tensor:
    """Indices of the ``b`` largest entries of ``errors`` (shape ``(N,)``), returned in ascending index order.

    ``i_1 … i_B = top_B(e_1 … e_B̄)``. Ties are broken deterministically in favour of the lower index (a
    stable descending sort), so equal errors never make runs irreproducible. NaN errors rank below every
    finite error (a broken candidate is never preferred). Returning the indices in batch order means
    ``b == N`` gives back the identical batch.
    """
    if errors.ndim != 1:
        raise ValueError(f"errors must be 1-D (one error per candidate), got shape {tuple(errors.shape)}")
    n = errors.shape[0]
    if not 1 <= b <= n:
        raise ValueError(f"cannot select b={b} of {n} candidates (need 1 <= b <= {n})")
    key = torch.nan_to_num(errors.detach().float(), nan=float("-inf"))
    order = torch.sort(key, descending=True, stable=True).indices[:b]
    return torch.sort(order).values


def hard_count(b: int, hard_fraction: float) -> int:
    """h = round(hard_fraction · B), the number of trained patches picked as the hardest (0 ≤ h ≤ B)."""
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    return min(b, max(0, int(round(hard_fraction * b))))


def select_hard_and_random(errors: torch.Tensor, b: int, n_hard: int,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n_hard`` hardest candidates (:func:`select_top_b`) plus ``b − n_hard`` drawn uniformly without
    replacement from the remaining ones; indices in ascending order.

    A hard/random mix keeps part of every batch an unbiased sample of the candidate distribution, as in
    Loshchilov & Hutter, "Online batch selection for faster training of neural networks" (ICLR workshop
    2016) and Composer's selective backprop, which both keep easy examples with some probability.
    ``n_hard = b`` is plain top-B; ``n_hard = 0`` is a random subset. ``generator`` makes the random part
    reproducible (its state is checkpointed by the trainer).
    """
    n = errors.shape[0]
    if not 1 <= b <= n:
        raise ValueError(f"cannot select b={b} of {n} candidates (need 1 <= b <= {n})")
    if not 0 <= n_hard <= b:
        raise ValueError(f"n_hard must be in [0, b={b}], got {n_hard}")
    hard = select_top_b(errors, n_hard) if n_hard else torch.zeros(0, dtype=torch.long, device=errors.device)
    if n_hard == b:
        return hard
    taken = torch.zeros(n, dtype=torch.bool)
    taken[hard.cpu()] = True
    rest = torch.nonzero(~taken).flatten()
    pick = rest[torch.randperm(rest.numel(), generator=generator)[:b - n_hard]]
    return torch.sort(torch.cat([hard.cpu(), pick])).values.to(errors.device)


def selection_recall(selected_idx: Sequence[int], reference_idx: Sequence[int]) -> float:
    """Selection recall of a cheaper scoring option: ``|top-B(option) ∩ top-B(exact)| / B``.

    ``selected_idx`` are the candidates an approximate scoring picked, ``reference_idx`` those the exact
    scoring (fp32, full resolution, all deep-supervision heads) picked from the same candidates; both of
    the same length B > 0, without repeats. 1 = the option selects exactly the same patches.
    """
    sel = [int(i) for i in (selected_idx.tolist() if torch.is_tensor(selected_idx) else selected_idx)]
    ref = [int(i) for i in (reference_idx.tolist() if torch.is_tensor(reference_idx) else reference_idx)]
    if len(sel) != len(ref) or not ref:
        raise ValueError(f"need two non-empty selections of equal size, got {len(sel)} and {len(ref)}")
    if len(set(sel)) != len(sel) or len(set(ref)) != len(ref):
        raise ValueError("selections must not repeat an index")
    return len(set(sel) & set(ref)) / len(ref)
