"""The GPFQ algorithm itself (greedy path-following quantization, Zhang, Zhou, Saab), free of models.

Notation (../shared/docs/methods.md section 3): one layer with weights ``W`` (N outputs x d inputs), float-path inputs
``X`` (m x d) and quantized-path inputs ``X~`` (m x d) on the same m samples. For t = 1..d, vectorised over
the N outputs::

    u     = U_{t-1} + W[:, t] X[:, t]^T                  (N x m)
    q_t   = Q_A( u X~[:, t] / ||X~[:, t]||^2 )           (nearest level of the alphabet A; 0 if the norm is 0)
    U_t   = u - q_t X~[:, t]^T

so U_t = sum_{j<=t} W_j X_j^T - Q_j X~_j^T. The alphabet is the mid-tread integer grid ``{k * delta : qmin <= k
<= qmax}`` with a step ``delta`` per output channel (or one per layer), so ``Q_A(z) = clamp(round(z / delta))``.

Two equivalent implementations:

* :func:`gpfq_u_form`: the definition above, memory O(N m); the reference for tests.
* :func:`gpfq_accumulated`: with ``H = X~^T X~`` and ``G = X~^T X`` (d x d, independent of m),
  ``u X~_t = sum_{j<=t} W_j G[t, j] - sum_{j<t} Q_j H[t, j]``; the first sum is one matrix product, the
  second is kept up to date block by block (rank-1 updates inside a block, one product per block).

Both take a leading group dimension (grouped / depthwise convolutions quantize each group on its own inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def step_sizes(w: torch.Tensor, bits: int, c: float | torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The step size of eq. 19: ``delta = 2 C / (2^b - 1) * ||W_n||_inf`` (per channel) or its layer mean.

    Args:
        w: weights (..., N, d): the last dimension is the input dimension.
        bits: weight bit width b.
        c: the constant C (a float, or a tensor broadcasting against the (..., N) result).
        per_channel: one step per output channel (else the paper's per-layer mean over channels).

    Returns:
        Positive steps of shape (..., N) (channels of all-zero weights get step 1).
    """
    inf = w.abs().amax(dim=-1)
    if not per_channel:
        inf = inf.flatten().mean().expand_as(inf)
    delta = 2.0 * c / (2**bits - 1) * inf
    return torch.where(delta > 0, delta, torch.ones_like(delta))


def _levels(v: torch.Tensor, denom: torch.Tensor, delta: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer level nearest to ``v / denom`` on the grid ``delta`` (0 where denom is 0)."""
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    k = torch.clamp(torch.round(v / (safe * delta)), qmin, qmax)
    return torch.where(denom > 0, k, torch.zeros_like(k))


def gpfq_u_form(w: torch.Tensor, x: torch.Tensor, xq: torch.Tensor, delta: torch.Tensor, qmin: int, qmax: int,
                return_u: bool = False):
    """GPFQ by its definition (keeps U, N x m). Reference implementation.

    Args:
        w: weights (g, N, d).
        x: float-path inputs (g, m, d).
        xq: quantized-path inputs (g, m, d).
        delta: steps (g, N).
        qmin: lowest integer level.
        qmax: highest integer level.
        return_u: also return the final U (g, N, m).

    Returns:
        Integer levels (g, N, d) as floats (and U when asked).
    """
    g, n, d = w.shape
    u = torch.zeros(g, n, x.shape[1], dtype=w.dtype, device=w.device)
    k = torch.zeros_like(w)
    for t in range(d):
        xt, xqt = x[:, :, t], xq[:, :, t]  # (g, m)
        u = u + w[:, :, t, None] * xt[:, None, :]
        v = torch.einsum("gnm,gm->gn", u, xqt)
        kt = _levels(v, (xqt * xqt).sum(-1, keepdim=True).expand_as(v), delta, qmin, qmax)
        k[:, :, t] = kt
        u = u - (kt * delta)[:, :, None] * xqt[:, None, :]
    return (k, u) if return_u else k


def gpfq_accumulated(w: torch.Tensor, h: torch.Tensor, gm: torch.Tensor, delta: torch.Tensor, qmin: int, qmax: int,
                     block: int = 32) -> torch.Tensor:
    """GPFQ from the accumulated products ``H = X~^T X~`` and ``G = X~^T X`` (memory independent of m).

    Args:
        w: weights (g, N, d).
        h: H (g, d, d), ``H[t, j] = X~_t . X~_j``.
        gm: G (g, d, d), ``G[t, j] = X~_t . X_j``.
        delta: steps (g, N).
        qmin: lowest integer level.
        qmax: highest integer level.
        block: columns per block of the lazy update.

    Returns:
        Integer levels (g, N, d) as floats; the same as :func:`gpfq_u_form` on the same data.
    """
    g, n, d = w.shape
    # Layout (g, d, N): one column's values are contiguous over the N outputs.
    # a[:, t] = sum_{j<=t} G[t, j] W_j: the float path's part, independent of the choices.
    a = torch.matmul(torch.tril(gm), w.transpose(-1, -2))
    diag = torch.diagonal(h, dim1=-2, dim2=-1)  # (g, d)
    kt_all = torch.zeros(g, d, n, dtype=w.dtype, device=w.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the column loop is many small ops: threading only adds barriers
    try:
        for s in range(0, d, block):
            e = min(s + block, d)
            hb = h[:, s:e, s:e]  # (g, b, b)
            ab = a[:, s:e].clone()  # running value of u X~_t for the block's columns
            for i in range(e - s):
                t = s + i
                kt = _levels(ab[:, i], diag[:, t, None].expand(g, n), delta, qmin, qmax)
                kt_all[:, t] = kt
                if i + 1 < e - s:
                    ab[:, i + 1 :] -= hb[:, i + 1 :, i, None] * (kt * delta)[:, None, :]
            if e < d:
                qb = kt_all[:, s:e] * delta[:, None, :]  # (g, b, N)
                torch.set_num_threads(threads)
                a[:, e:] -= torch.matmul(h[:, e:, s:e], qb)
                torch.set_num_threads(1)
    finally:
        torch.set_num_threads(threads)
    return kt_all.transpose(-1, -2).contiguous()


@dataclass
class LayerStats:
    """Accumulated second moments of one layer's sampled inputs (per group).

    Attributes:
        h: X~^T X~ (g, d, d).
        gm: X~^T X (g, d, d).
        f: X^T X (g, d, d), for the error of the float output.
        m: number of sampled rows.
    """

    h: torch.Tensor
    gm: torch.Tensor
    f: torch.Tensor
    m: int = 0
    rows: list | None = None  # the sampled rows themselves while they are few (cheaper exact errors)
    max_row_elems: int = 1 << 24

    @classmethod
    def zeros(cls, g: int, d: int, dtype=torch.float64, device="cpu") -> "LayerStats":
        z = lambda: torch.zeros(g, d, d, dtype=dtype, device=device)  # noqa: E731
        return cls(z(), z(), z(), 0, [])

    def add(self, x: torch.Tensor, xq: torch.Tensor) -> None:
        """Add sampled rows: x, xq of shape (g, m, d)."""
        # Products in the inputs' precision (float32 in calibration), sums over chunks in the accumulator's.
        xqt = xq.transpose(-1, -2)
        self.h += torch.matmul(xqt, xq).to(self.h.dtype)
        self.gm += torch.matmul(xqt, x).to(self.h.dtype)
        self.f += torch.matmul(x.transpose(-1, -2), x).to(self.h.dtype)
        self.m += x.shape[1]
        if self.rows is not None:
            g, _, d = self.h.shape
            if self.m * g * d <= self.max_row_elems and self.m < 3 * d:
                self.rows.append((x, xq))
            else:
                self.rows = None


def channel_errors(w: torch.Tensor, q: torch.Tensor, st: LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared errors ``||X w_n - X~ q_n||^2`` and ``||X w_n||^2`` per output channel from the moments.

    Args:
        w: float weights (g, N, d).
        q: quantized weights (g, N, d), real-valued (levels times step).
        st: the layer's moments.

    Returns:
        (err (g, N), ref (g, N)).
    """
    if st.rows:  # few rows (m < 3 d): from the rows, O(m d N) instead of O(d^2 N)
        x = torch.cat([r[0] for r in st.rows], 1)
        xq = torch.cat([r[1] for r in st.rows], 1)
        yw = torch.matmul(x, w.to(x.dtype).transpose(-1, -2))  # (g, m, N)
        diff = yw - torch.matmul(xq, q.to(x.dtype).transpose(-1, -2))
        return diff.pow(2).sum(-2).to(st.h.dtype), yw.pow(2).sum(-2).to(st.h.dtype)
    w, q = w.to(st.h.dtype), q.to(st.h.dtype)
    ref = (torch.matmul(w, st.f) * w).sum(-1)
    cross = (torch.matmul(q, st.gm) * w).sum(-1)
    qq = (torch.matmul(q, st.h) * q).sum(-1)
    return (ref - 2 * cross + qq).clamp(min=0), ref
