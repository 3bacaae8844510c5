"""Factored products whose factors are sharded across a ``torch.distributed`` process group.

``M = A @ B`` with ``A`` (..., ldim, mdim) split by rows and ``B`` (..., mdim, rdim) by columns
over the ranks of a group, as vocabulary-parallel embeddings and FSDP leave them. Decompositions
go through a tall-skinny QR (TSQR) of each factor, so only ``mdim x mdim`` blocks cross ranks,
never anything with ``ldim`` or ``rdim`` rows. The same code runs on gloo (CPU) and NCCL (GPU).
``import lowrank_op`` does not import this package (nor ``torch.distributed``): import it as
``lowrank_op.distributed`` when needed.

Inputs and layouts
------------------
Each factor comes either as this rank's plain shard (``A_local`` (..., ldim_r, mdim),
``B_local`` (..., mdim, rdim_r)) with a ``group`` (default: the world), or as a
``torch.distributed.tensor.DTensor`` on a 1-D device mesh, whose ``.to_local()`` and mesh group
are taken. A factor's *layout* says how it is spread:

* ``"shard"``: split along its outer matrix dim (``A``'s rows, ``B``'s columns; DTensor
  ``Shard(ndim - 2)`` / ``Shard(ndim - 1)``). Shards may be uneven; a rank may hold none.
* ``"replicate"``: every rank holds all of it (DTensor ``Replicate()``).
* ``"batch"``: split along a leading (batch) dim, e.g. by heads under tensor parallelism
  (DTensor ``Shard(d)``, ``d < ndim - 2``): every rank holds whole matrices.

A factor that is not ``"shard"`` needs no communication for its own QR: every rank factorises
its own matrices (Householder) and nothing about that factor is sent. When neither factor is
``"shard"`` the whole product is local and no collective runs at all.

Who computes what
-----------------
Each rank QRs its own rows; the small pieces (``mdim x mdim`` per rank and factor) are
*gathered to rank 0 of the group* (:data:`ROOT`), which runs every small dense decomposition (the
second-level QR of the stacked ``R`` factors, the SVD or norm of the ``mdim x mdim`` core, the
eigenvalues of ``B A``) and *broadcasts* the results. Replicated results (``R``, ``S``, the norm,
eigenvalues) are therefore bitwise identical on every rank by construction, without relying on
LAPACK, BLAS or thread counts being the same everywhere, and every branch that depends on data
(CholeskyQR2's fallback) is decided by rank 0 and broadcast, so the ranks never take different
collectives. Products with a ``"batch"`` factor keep their matrices on the rank that holds them:
there the core is decomposed locally, from a broadcast (identical) ``R`` of the sharded factor.

Communication and its bytes
---------------------------
Every collective goes through one wrapper, which counts the bytes this rank *contributes* (the
payload, ``numel * element_size`` of the flat buffer it passes in; complex values count as two
reals): for ``all_gather``, ``gather`` and ``all_reduce`` that is the rank's own tensor; for
``broadcast`` the payload on rank 0 and nothing on the others. What an algorithm puts on the wire
(a ring all-reduce sends up to ``2 (P - 1) / P`` times its payload) is the backend's business.
:func:`count_bytes` reads the counts. With ``P`` ranks, ``m = mdim``, ``e`` bytes per element of
the compute dtype, per batch member (``K = sum_r min(n_r, m) <= P m`` stacked rows,
``p = min(N, m)`` for ``N`` global rows, ``k = min(ldim, mdim, rdim)``):

=====================================  ======================================================
:func:`tsqr`                           gather ``m^2 e``; rank 0 broadcasts ``(K p + p m) e``
                                       (``p m e`` without ``Q``)
``svdvals()`` / ``norm()``             gather ``2 m^2 e``; rank 0 broadcasts ``k e`` / ``e``
``svd()``                              gather ``2 m^2 e``; rank 0 broadcasts ``(K_A + K_B + 1) k e``
``eigenvalues``                        gather ``m^2 e``; rank 0 broadcasts ``m`` complex values
``trace()``                            all-reduce of one element
``matmul(x)`` (``x`` ..., rdim_r, k)   all-reduce ``m k e`` (+ the shape check)
:func:`sharded_outer_reduction`        gather ``(p^2 + q^2 + q p) e``; rank 0 broadcasts as much
=====================================  ======================================================

Nothing grows with ``ldim`` or ``rdim``. Operations that take new tensors first all-gather one
fixed-size row of int64 describing them (``MAX_DIMS + 3`` to ``2 MAX_DIMS + 8`` of them, 88
to 192 bytes, counted as ``"check"``), so that bad input on any rank makes *every* rank raise together
instead of leaving the others waiting in a collective. Arguments that are not tensors
(``method``, ``layouts``, ``closing``) are taken to be the same on every rank, as in any SPMD
program. Each collective is bounded by the process group's timeout
(``init_process_group(..., timeout=...)``).

Not here: gradients (everything runs under ``torch.no_grad()``), caching (a cache hit on one rank
and a miss on another would deadlock the group; hold on to results instead), and 2-D meshes.

Modules
-------
The public names below are re-exported here; the submodules hold them, imports flowing one way
(``comm`` <- ``qr`` <- ``sharded``, ``outer``):

* ``comm``: the one collective wrapper and its byte counts (:class:`ByteCounter`,
  :func:`count_bytes`), packing, gather, broadcast and all-reduce of named tensors, process-group
  resolution, DTensor unwrapping and the shape agreement across ranks; :data:`ROOT`,
  :data:`MAX_DIMS`, :data:`LAYOUTS`.
* ``qr``: the QR of a row-sharded factor: TSQR (first level on each rank, second level on rank 0),
  CholeskyQR2 with its TSQR fallback, local Householder factors; :func:`tsqr`, :data:`QR_METHODS`.
* ``sharded``: :class:`ShardedFactoredMatrix` and the decomposition of its small core.
* ``outer``: :func:`sharded_outer_reduction`.

References
----------
Demmel, Grigori, Hoemmen and Langou, "Communication-optimal parallel and sequential QR and LU
factorizations", SIAM J. Sci. Comput. 34 (2012) (TSQR). Fukaya, Nakatsukasa, Yanagisawa and
Yamamoto, "CholeskyQR2: a simple and communication-avoiding algorithm", ScalA 2014.
"""

from __future__ import annotations

from lowrank_op.distributed.comm import LAYOUTS, MAX_DIMS, ROOT, ByteCounter, count_bytes
from lowrank_op.distributed.qr import QR_METHODS, tsqr
from lowrank_op.distributed.sharded import ShardedFactoredMatrix
from lowrank_op.distributed.outer import sharded_outer_reduction

__all__ = [
    "LAYOUTS",
    "MAX_DIMS",
    "QR_METHODS",
    "ROOT",
    "ByteCounter",
    "ShardedFactoredMatrix",
    "count_bytes",
    "sharded_outer_reduction",
    "tsqr",
]
