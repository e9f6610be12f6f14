"""Top-B selection of the hardest candidates (step 2 of Algorithm 1 in Schmidt-Mengin et al. 2021)."""
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
