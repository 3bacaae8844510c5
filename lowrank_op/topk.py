"""Top-k singular values and eigenvalues of ``A @ B``: the exact factored path or a Krylov solver.

:func:`svds` and :func:`eigs` take the factors (leading dims broadcast), loop over the matrices
of a batch, and for each one run the exact factored decomposition of :mod:`lowrank_op.kernels` or
ARPACK / PROPACK through :mod:`lowrank_op.scipy_bridge` (imported only when a Krylov solver runs).
``method="auto"`` decides per matrix with the cost model below, whose constants live in the block
at the top of this module and nowhere else.
"""

from __future__ import annotations

import itertools
import numbers
import warnings

import torch
from torch import Tensor

from lowrank_op import kernels
from lowrank_op._checks import check_choice, warn_off_host
from lowrank_op.errors import UndefinedGradientWarning

SVDS_METHODS = ("auto", "exact", "arpack", "propack")
EIGS_METHODS = ("auto", "exact", "arpack")

# --- The cost model of method="auto" (the only place its constants live) -------------------------
# Seconds per unit of work on the project's machine kind (2 cores, float32, 2 threads), fitted to
# timings of the exact paths and of single applications at ldim = rdim = 20000, mdim 256 to 4000.
# Only their ratios matter: they turn the exact path's cost into a number of operator
# applications, the budget ARPACK is given. bench/bench_topk.py prints each plan and budget
# beside the measured times and applications, to re-check them on other hardware.
#: Exact SVD with vectors, per unit of ``(ldim + rdim) mdim^2 + mdim^3``.
EXACT_SVD_SECONDS_PER_UNIT = 8e-11
#: Exact singular values only (no Q, U or V formed), per the same unit.
EXACT_SVDVALS_SECONDS_PER_UNIT = 5.5e-11
#: Exact eigenvalues, per unit of ``ldim mdim n + EIG_CUBIC_WEIGHT n^3``, ``n = min(ldim, mdim)``
#: (forming the ``n x n`` matrix, then its non-symmetric eigenvalue problem).
EXACT_EIG_SECONDS_PER_UNIT = 3.5e-11
EIG_CUBIC_WEIGHT = 1.0
#: One application of the operator to a vector inside ARPACK (its own work included), per unit of
#: ``(ldim + rdim) mdim``: ARPACK's time over its applications, mdim 256 to 4000, flat spectra.
APPLICATION_SECONDS_PER_UNIT = 1.9e-10
#: The fixed cost of one application: conversions and ARPACK's Python-level loop.
APPLICATION_OVERHEAD_SECONDS = 2.3e-3
#: ``"auto"`` runs ARPACK only when the exact path's cost buys at least this many of ARPACK's
#: cheapest possible runs (one Krylov basis of ``ncv = max(2k + 1, 20)`` vectors). At k = 10,
#: ARPACK's SVD converged within 1.6 of them (66 applications) on decaying spectra and took 6 to
#: 14 (250 to 566) on flat ones; Arnoldi took 2.2 to 2.6 on decaying, 12 to 142 on flat ones. With
#: 2, "auto" switched at mdim 512 (ldim = rdim = 20000), gaining 1.24x on a decaying spectrum
#: and losing 2.7x on a flat one (budget spent, then exact); 4 moves the switch to about 800.
AUTO_MIN_KRYLOV_RUNS = 4.0

KINDS = ("svd", "svdvals", "eigs")


def _ncv(k: int) -> int:
    """ARPACK's default Krylov basis size for ``k`` wanted values (SciPy's rule)."""
    return max(2 * k + 1, 20)


def application_seconds(ldim: int, mdim: int, rdim: int) -> float:
    """Estimated seconds for one application of ``A @ B`` (or its adjoint) to one vector."""
    return APPLICATION_SECONDS_PER_UNIT * (ldim + rdim) * mdim + APPLICATION_OVERHEAD_SECONDS


def exact_seconds(kind: str, ldim: int, mdim: int, rdim: int) -> float:
    """Estimated seconds for the exact factored path of ``kind`` on one product."""
    if kind == "eigs":
        n = min(ldim, mdim)
        return EXACT_EIG_SECONDS_PER_UNIT * (ldim * mdim * n + EIG_CUBIC_WEIGHT * n**3)
    per_unit = EXACT_SVD_SECONDS_PER_UNIT if kind == "svd" else EXACT_SVDVALS_SECONDS_PER_UNIT
    return per_unit * ((ldim + rdim) * mdim**2 + mdim**3)


def arpack_k_limit(kind: str, ldim: int, mdim: int, rdim: int) -> tuple[int, str]:
    """The largest ``k`` ARPACK can deliver, and the rule in SciPy's wording: ``k < min(ldim, rdim)``
    for singular values, ``k < n - 1`` for eigenvalues of the ``n x n`` operator Arnoldi runs on."""
    if kind == "eigs":
        return min(ldim, mdim) - 2, "0 < k < min(ldim, mdim) - 1"
    return min(ldim, rdim) - 1, "0 < k < min(ldim, rdim)"


def plan(kind: str, ldim: int, mdim: int, rdim: int, k: int) -> tuple[str, int | None]:
    """What ``method="auto"`` runs for one ``ldim x rdim`` product of inner dim ``mdim``.

    Parameters
    ----------
    kind : {"svd", "svdvals", "eigs"}
        Singular triplets, singular values only, or eigenvalues.
    ldim, mdim, rdim, k : int

    Returns
    -------
    method : {"exact", "arpack"}
    max_applications : int or None
        For ``"arpack"``, the number of operator applications estimated to cost as much as the
        exact path (:func:`exact_seconds` / :func:`application_seconds`). ARPACK is stopped
        there and the exact path run instead, so no product costs much more than twice the
        exact path.

    Notes
    -----
    ARPACK needs at least ``ncv = max(2k + 1, 20)`` Krylov steps, each two applications for
    singular values (of ``A B`` and of its adjoint) and one for eigenvalues; ``"arpack"`` is
    planned when the budget holds ``AUTO_MIN_KRYLOV_RUNS`` such runs and ARPACK can deliver
    ``k`` values at all (:func:`arpack_k_limit`).
    """
    check_choice("kind", kind, KINDS)
    per_step = 1 if kind == "eigs" else 2
    budget = int(exact_seconds(kind, ldim, mdim, rdim) / application_seconds(ldim, mdim, rdim))
    if k > arpack_k_limit(kind, ldim, mdim, rdim)[0] or budget < AUTO_MIN_KRYLOV_RUNS * per_step * _ncv(k):
        return "exact", None
    return "arpack", budget


# --- Validation ------------------------------------------------------------------------------------
def _check_k(k: object, limit: int, rule: str, advice: str = "") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 < int(k) <= limit:
        raise ValueError(f"`k` must be an integer satisfying `{rule}` (= {limit} here); got {k!r}.{advice}")
    return int(k)


def _check_arpack_k(kind: str, k: int, ldim: int, mdim: int, rdim: int) -> None:
    _check_k(k, *arpack_k_limit(kind, ldim, mdim, rdim), " ARPACK needs it; use method='exact'.")


def _check_options(tol: object, maxiter: object, random_state: object) -> None:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"`tol` must be a non-negative number (0 means machine precision); got {tol!r}.")
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, numbers.Integral) or maxiter <= 0):
        raise ValueError(f"`maxiter` must be a positive integer or None; got {maxiter!r}.")
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral) or random_state < 0:
        raise ValueError(f"`random_state` must be a non-negative integer seed; got {random_state!r}.")


def _records_gradients(A: Tensor, B: Tensor) -> bool:
    return torch.is_grad_enabled() and (A.requires_grad or B.requires_grad)


def _warn_for_krylov(method: str, A: Tensor, B: Tensor) -> None:
    """Warn, once per call, about what an explicitly chosen Krylov method cannot do here (the
    warnings point at the caller of :func:`svds` or :func:`eigs`)."""
    if method in ("arpack", "propack"):
        warn_off_host(A, f"method={method!r}", stacklevel=4)
        if _records_gradients(A, B):
            warnings.warn(
                f"method={method!r} records no gradients: its results are detached from A and B. "
                "Use method='exact' (or 'auto', which takes the exact path while gradients are "
                "recorded) to differentiate.",
                UndefinedGradientWarning,
                stacklevel=3,
            )


def _auto_allowed(A: Tensor, B: Tensor) -> bool:
    """``"auto"`` considers ARPACK only on the CPU and when no gradients are being recorded."""
    return A.device.type == "cpu" and not _records_gradients(A, B)


# --- The loop over a batch -------------------------------------------------------------------------
def _matrices(A: Tensor, B: Tensor, progress: bool, desc: str):
    """``(batch_shape, iterator of 2-D (A, B) pairs)``, with a tqdm bar if ``progress``."""
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    A = A.expand(*batch, *A.shape[-2:])
    B = B.expand(*batch, *B.shape[-2:])
    indices = list(itertools.product(*(range(n) for n in batch)))
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise ImportError(
                "progress=True needs tqdm; install it with pip install 'lowrank_op[progress]' "
                "or pass progress=False."
            ) from None
        indices = tqdm(indices, desc=desc, unit="matrix")
    return batch, ((A[index], B[index]) for index in indices)


def _stack(batch: torch.Size, parts: list[Tensor | None], shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    """The per-matrix results as one tensor of shape ``(*batch, *shape)`` (also for an empty batch)."""
    if not parts:
        return torch.empty(*batch, *shape, dtype=dtype, device=device)
    return torch.stack(parts).reshape(*batch, *shape)


# --- One matrix, by the chosen method -------------------------------------------------------------
def _scipy_bridge():
    """:mod:`lowrank_op.scipy_bridge`, imported (with SciPy) only when a Krylov solver runs."""
    from lowrank_op import scipy_bridge

    return scipy_bridge


def _run_one(kind: str, A: Tensor, B: Tensor, k: int, method: str, exact, krylov):
    """One 2-D product by ``exact()`` or ``krylov(method, max_applications)``; ``"auto"`` plans,
    gives ARPACK its budget and falls back to ``exact()`` when ARPACK fails or runs over."""
    if method == "auto":
        method, budget = plan(kind, A.shape[-2], A.shape[-1], B.shape[-1], k) if _auto_allowed(A, B) else ("exact", None)
        if method == "arpack":
            try:  # + k: SciPy's svds applies the operator to its k Ritz vectors once more
                return krylov(method, budget + k)
            except _scipy_bridge().KrylovFailure:
                return exact()
    return exact() if method == "exact" else krylov(method, None)


# --- Singular values -------------------------------------------------------------------------------
def _svds_exact(A: Tensor, B: Tensor, k: int, want_vectors: bool) -> tuple[Tensor | None, Tensor, Tensor | None]:
    if not want_vectors:
        return None, kernels.svdvals(A, B)[..., :k], None
    U, S, V = kernels.svd(A, B)
    return U[..., :k], S[..., :k], V[..., :k]


def svds(
    A: Tensor,
    B: Tensor,
    k: int = 6,
    method: str = "auto",
    *,
    return_singular_vectors: bool = True,
    tol: float = 0.0,
    maxiter: int | None = None,
    random_state: int = 0,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor] | Tensor:
    """The ``k`` largest singular values (and vectors) of ``A @ B``.

    Parameters
    ----------
    A : Tensor, shape (..., ldim, mdim)
    B : Tensor, shape (..., mdim, rdim)
    k : int
        ``0 < k <= min(ldim, mdim, rdim)``; ARPACK also needs ``k < min(ldim, rdim)``.
    method : {"auto", "exact", "arpack", "propack"}
        ``"exact"``: the factored SVD (:func:`lowrank_op.kernels.svd`), truncated.
        ``"arpack"``/``"propack"``: ``scipy.sparse.linalg.svds`` with that solver, applying the
        product only through the factors. ``"auto"`` runs ARPACK when the cost model
        (:func:`plan`) finds that the exact path, estimated from ldim, mdim and rdim, costs at
        least ``AUTO_MIN_KRYLOV_RUNS`` of ARPACK's cheapest runs for this ``k``, and the exact
        path otherwise. ARPACK is stopped once it has spent the exact path's estimated cost, and
        the exact path runs instead, which bounds the cost near twice the exact path.
    return_singular_vectors : bool
    tol : float
        Krylov tolerance (SciPy's meaning; 0 is machine precision). Ignored by ``"exact"``.
    maxiter : int, optional
        Krylov iteration limit (SciPy's meaning). Ignored by ``"exact"``.
    random_state : int
        Seed of the Krylov start vector; each matrix of a batch starts from the same seed, so a
        matrix gets the same result alone or in a batch.
    progress : bool
        Show a tqdm progress bar over the matrices of a batch (needs the ``progress`` extra).

    Returns
    -------
    U : Tensor, shape (..., ldim, k)
    S : Tensor, shape (..., k)
        Real, descending.
    V : Tensor, shape (..., rdim, k)
        Right singular vectors as columns, as :meth:`FactoredMatrix.svd` returns them
        (TransformerLens's ``Vh``; SciPy's ``vh`` is its conjugate transpose).
        Only ``S`` is returned when ``return_singular_vectors`` is False.

    Notes
    -----
    Exact path: ``O((ldim + rdim) mdim^2 + mdim^3)``. ARPACK: Lanczos on the smaller of
    ``M^H M`` and ``M M^H``, ``O((ldim + rdim) mdim)`` per application: 66 applications for
    k = 10 on decaying spectra, 250 to 550 on flat ones (bench/bench_topk.py). PROPACK is never
    chosen by ``"auto"``: at ldim = rdim = 20000, mdim = 4000 it was the fastest on a decaying
    spectrum but did not converge within its Lanczos basis on a flat one. Krylov results are
    detached (no gradients); ``"auto"`` takes the exact path while gradients are recorded and,
    on a non-CPU device, always (the exact path runs on the device; SciPy on the host).
    16-bit factors are computed in float32.

    Examples
    --------
    >>> A, B = torch.randn(3000, 400), torch.randn(400, 3000)
    >>> S = svds(A, B, 5, method="arpack", return_singular_vectors=False)
    >>> torch.allclose(S, kernels.svdvals(A, B)[:5], rtol=1e-4)
    True
    """
    check_choice("method", method, SVDS_METHODS)
    _check_options(tol, maxiter, random_state)
    ldim, mdim, rdim = A.shape[-2], A.shape[-1], B.shape[-1]
    k = _check_k(k, min(ldim, mdim, rdim), "0 < k <= min(ldim, mdim, rdim)")
    if method == "arpack":
        _check_arpack_k("svd", k, ldim, mdim, rdim)
    _warn_for_krylov(method, A, B)
    options = dict(tol=float(tol), maxiter=maxiter, random_state=int(random_state))
    want = bool(return_singular_vectors)

    def one(a: Tensor, b: Tensor):
        return _run_one(
            "svd" if want else "svdvals", a, b, k, method,
            exact=lambda: _svds_exact(a, b, k, want),
            krylov=lambda solver, cap: _scipy_bridge().svds(a, b, k, solver, want_vectors=want, max_applications=cap, **options),
        )

    batch, matrices = _matrices(A, B, progress, "svds")
    results = [one(a, b) for a, b in matrices]
    dtype = kernels.compute_dtype(A.dtype)
    S = _stack(batch, [r[1] for r in results], (k,), dtype.to_real(), A.device)
    if not want:
        return S
    U = _stack(batch, [r[0] for r in results], (ldim, k), dtype, A.device)
    V = _stack(batch, [r[2] for r in results], (rdim, k), dtype, A.device)
    return U, S, V


# --- Eigenvalues -----------------------------------------------------------------------------------
def _eigs_exact(A: Tensor, B: Tensor, k: int) -> Tensor:
    return kernels.eigvals(A, B)[..., :k]


def eigs(
    A: Tensor,
    B: Tensor,
    k: int = 6,
    method: str = "auto",
    *,
    tol: float = 0.0,
    maxiter: int | None = None,
    random_state: int = 0,
    progress: bool = False,
) -> Tensor:
    """The ``k`` eigenvalues of largest modulus of a square ``A @ B`` (``ldim == rdim``).

    Parameters
    ----------
    A : Tensor, shape (..., ldim, mdim)
    B : Tensor, shape (..., mdim, ldim)
    k : int
        ``0 < k <= min(ldim, mdim)`` (the product has at most ``mdim`` non-zero eigenvalues);
        ARPACK also needs ``k < min(ldim, mdim) - 1``.
    method : {"auto", "exact", "arpack"}
        ``"exact"``: :func:`lowrank_op.kernels.eigvals`, truncated. ``"arpack"``: Arnoldi
        (``scipy.sparse.linalg.eigs``) on whichever of ``A B`` and ``B A`` is smaller, applied
        through the factors. ``"auto"``: as for :func:`svds`, with the eigenvalue cost model.
    tol, maxiter, random_state, progress
        As for :func:`svds`.

    Returns
    -------
    values : Tensor, shape (..., k)
        Complex, by descending modulus (ties in the order found).

    Notes
    -----
    Exact path: ``O(ldim mdim^2 + mdim^3)``. Arnoldi: ``O(ldim mdim)`` per application, plus
    ARPACK's own ``O(n ncv^2)`` per restart with ``n = min(ldim, mdim)``. Results are detached.
    Arnoldi converges slowly when the top eigenvalues are close in modulus: on a flat float32
    spectrum (ldim 20000, mdim 2048, k = 10) it took 2,989 applications, 14x the exact path's
    time, and came back 6.6e-3 off in relative terms (the exact path: 6.4e-6). ``"auto"`` stops
    it at its budget; an explicit ``"arpack"`` on such products is best run in float64.
    """
    check_choice("method", method, EIGS_METHODS)
    _check_options(tol, maxiter, random_state)
    ldim, mdim, rdim = A.shape[-2], A.shape[-1], B.shape[-1]
    if ldim != rdim:
        raise ValueError(
            f"eigenvalues need a square product (ldim == rdim); got shape ({ldim}, {rdim}). Use "
            "svds for the singular values of a rectangular product."
        )
    k = _check_k(k, min(ldim, mdim), "0 < k <= min(ldim, mdim)")
    if method == "arpack":
        _check_arpack_k("eigs", k, ldim, mdim, rdim)
    _warn_for_krylov(method, A, B)
    options = dict(tol=float(tol), maxiter=maxiter, random_state=int(random_state))

    def one(a: Tensor, b: Tensor) -> Tensor:
        return _run_one(
            "eigs", a, b, k, method,
            exact=lambda: _eigs_exact(a, b, k),
            krylov=lambda solver, cap: _scipy_bridge().eigs(a, b, k, max_applications=cap, **options),
        )

    batch, matrices = _matrices(A, B, progress, "eigs")
    values = [one(a, b) for a, b in matrices]
    dtype = torch.promote_types(kernels.compute_dtype(A.dtype), torch.complex64)
    return _stack(batch, values, (k,), dtype, A.device)
