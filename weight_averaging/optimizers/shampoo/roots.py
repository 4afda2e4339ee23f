r"""Inverse p-th roots of symmetric PSD matrices, one at a time or a stack split over devices.

`matrix_inverse_pth_root` computes :math:`(A + r I)^{-1/p}` by an eigendecomposition or by
the coupled Newton iteration, and returns an error with it so that a caller can keep the
previous root when a new one failed (`root_is_valid`). `batched_inverse_pth_roots` maps it
over an ``[n, d, d]`` stack, on one device or split over a pmap/shard_map axis or a jit
mesh; every device then holds the same roots as a one-device run.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

ROOT_METHODS = ("eigh", "newton")
# Statistics per batched root call (`chunk_length`): 4 matrices of 1024 x 1024. An
# eigendecomposition's temporaries are about 6 of its inputs, so about 100 MiB.
DEFAULT_CHUNK_BYTES = 16 * 2**20


def _power_iteration(matrix, num_iters, precision):
  """Largest eigenvalue of a symmetric PSD matrix, from a fixed start vector."""
  n = matrix.shape[0]
  v0 = jnp.ones((n,), matrix.dtype) / math.sqrt(n)

  def body(_, v):
    w = jnp.matmul(matrix, v, precision=precision)
    return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(matrix.dtype).tiny)

  v = lax.fori_loop(0, num_iters, body, v0)
  return jnp.dot(v, jnp.matmul(matrix, v, precision=precision), precision=precision)


def _matrix_power(matrix, p, precision):
  """``matrix**p`` for a static positive int p, by binary exponentiation."""
  result, base = None, matrix
  while p:
    if p & 1:
      result = base if result is None else jnp.matmul(result, base, precision=precision)
    p >>= 1
    if p:
      base = jnp.matmul(base, base, precision=precision)
  return result


def _ridge(lambda_max, epsilon, relative_epsilon):
  # A zero matrix has lambda_max = 0; falling back to an absolute ridge keeps the
  # root finite (epsilon**(-1/p) * I) instead of dividing by zero.
  if not relative_epsilon:
    return jnp.asarray(epsilon, jnp.float32)
  return epsilon * jnp.where(lambda_max > 0, lambda_max, 1.0)


def _eigh_root(matrix, p, epsilon, relative_epsilon, precision):
  w, v = jnp.linalg.eigh(matrix)
  # The eigendecomposition reconstructs the matrix to ~float32 precision when it
  # converged; a large residual means it did not.
  recon = jnp.matmul(v * w[None, :], v.T, precision=precision)
  error = jnp.linalg.norm(recon - matrix) / jnp.maximum(jnp.linalg.norm(matrix),
                                                        jnp.finfo(jnp.float32).tiny)
  # Statistics are PSD in exact arithmetic; rounding can leave small negative
  # eigenvalues, so the spectrum is shifted up by -min(lambda_min, 0).
  w = w - jnp.minimum(jnp.min(w), 0.0)
  w = w + _ridge(jnp.max(w), epsilon, relative_epsilon)
  root = jnp.matmul(v * (w ** (-1.0 / p))[None, :], v.T, precision=precision)
  return root, error


def _newton_root(matrix, p, epsilon, relative_epsilon, num_iters, tolerance,
                 power_iterations, precision):
  n = matrix.shape[0]
  identity = jnp.eye(n, dtype=jnp.float32)
  lambda_max = (_power_iteration(matrix, power_iterations, precision)
                if relative_epsilon else jnp.zeros([], jnp.float32))
  a = matrix + _ridge(lambda_max, epsilon, relative_epsilon) * identity
  # With z = (1 + p) / (2 ||A||_F) the spectrum of M_0 = z A lies in (0, (1 + p) / 2],
  # inside the region (0, p + 1) where the iteration converges.
  z = (1.0 + p) / (2.0 * jnp.linalg.norm(a))
  m0 = z * a
  h0 = z ** (1.0 / p) * identity
  err0 = jnp.max(jnp.abs(m0 - identity))

  def cond(carry):
    i, _, _, _, _, _, run = carry
    return jnp.logical_and(i < num_iters, run)

  def body(carry):
    i, m, h, err, _, _, _ = carry
    t = (1.0 + 1.0 / p) * identity - m / p
    m_new = jnp.matmul(_matrix_power(t, p, precision), m, precision=precision)
    h_new = jnp.matmul(h, t, precision=precision)
    err_new = jnp.max(jnp.abs(m_new - identity))
    # Rounding makes the error grow again once converged; stop and keep the
    # previous iterate then.
    improved = err_new < 1.2 * err
    m = jnp.where(improved, m_new, m)
    h = jnp.where(improved, h_new, h)
    err = jnp.where(improved, err_new, err)
    run = jnp.logical_and(improved, err_new > tolerance)
    return i + 1, m, h, err, m_new, h_new, run

  carry = (jnp.zeros([], jnp.int32), m0, h0, err0, m0, h0, err0 > tolerance)
  _, _, h, err, _, _, _ = lax.while_loop(cond, body, carry)
  return h, err


def matrix_inverse_pth_root(matrix: jnp.ndarray, p: int, *, epsilon: float = 1e-6,
                            relative_epsilon: bool = True, method: str = "eigh",
                            newton_iterations: int = 100, newton_tolerance: float = 1e-6,
                            power_iterations: int = 100,
                            precision=lax.Precision.HIGHEST
                            ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  r"""Inverse p-th root :math:`(A + r I)^{-1/p}` of a symmetric PSD matrix, in float32.

  The ridge is :math:`r = \epsilon\,\lambda_{max}(A)` with ``relative_epsilon``
  (:math:`\epsilon` alone when :math:`A = 0`), else :math:`r = \epsilon`.

  * ``method='eigh'``: with :math:`A = U \operatorname{diag}(\lambda) U^\top` and the
    spectrum shifted to be non-negative, :math:`\lambda' = \lambda - \min(\lambda_{min}, 0)`,
    the root is :math:`U \operatorname{diag}((\lambda' + r)^{-1/p}) U^\top` (here
    :math:`\lambda_{max}` is exact). The error is the relative Frobenius residual
    :math:`\lVert U \operatorname{diag}(\lambda) U^\top - A \rVert / \lVert A \rVert`
    of the decomposition.
  * ``method='newton'``: the coupled Newton iteration (Higham, *Functions of
    Matrices*, 7.18) on :math:`\tilde A = A + r I` with :math:`\lambda_{max}` from
    ``power_iterations`` power-iteration steps: :math:`z = (1+p)/(2\lVert\tilde A\rVert_F)`,
    :math:`M_0 = z\tilde A`, :math:`H_0 = z^{1/p} I`, then
    :math:`T = (1 + 1/p) I - M/p`, :math:`M \leftarrow T^p M`, :math:`H \leftarrow H T`
    until :math:`\max|M - I| <` ``newton_tolerance``, ``newton_iterations`` steps,
    or the error grows by 1.2x (the previous iterate is kept). The error is
    :math:`\max|M - I|`.

  Args:
    matrix: ``[n, n]`` symmetric PSD matrix (cast to float32).
    p: positive int exponent (static).
    epsilon: the ridge, relative or absolute.
    relative_epsilon: scale ``epsilon`` by the largest eigenvalue.
    method: ``'eigh'`` or ``'newton'``.
    newton_iterations, newton_tolerance, power_iterations: Newton's settings.
    precision: precision of the matrix products.

  Returns:
    ``(root, error)``; the error is ``inf`` when the root is not finite, so a root
    is usable iff ``error < threshold`` (see `root_is_valid`).
  """
  if method not in ROOT_METHODS:
    raise ValueError(f"method must be one of {ROOT_METHODS}, got {method!r}")
  p = int(p)
  if p < 1:
    raise ValueError(f"p must be a positive int, got {p}")
  matrix = jnp.asarray(matrix, jnp.float32)
  # Symmetrise: the statistics are symmetric in exact arithmetic only.
  matrix = 0.5 * (matrix + matrix.T)
  if method == "eigh":
    root, error = _eigh_root(matrix, p, epsilon, relative_epsilon, precision)
  else:
    root, error = _newton_root(matrix, p, epsilon, relative_epsilon, newton_iterations,
                               newton_tolerance, power_iterations, precision)
  finite = jnp.all(jnp.isfinite(root)) & jnp.isfinite(error)
  return root, jnp.where(finite, error, jnp.inf).astype(jnp.float32)


def root_is_valid(error: jnp.ndarray, threshold: float) -> jnp.ndarray:
  """Whether a root with this error may replace the previous one (NaN fails)."""
  return jnp.isfinite(error) & (error < threshold)


# ---------------------------------------------------------------------------
# Stacks of roots, split over devices
# ---------------------------------------------------------------------------


def _axis_size(axis_name):
  if hasattr(lax, "axis_size"):
    return lax.axis_size(axis_name)
  return lax.psum(1, axis_name)  # a Python int under pmap and shard_map


def _shard_map(f, mesh, in_specs, out_specs):
  # The body has no collectives, so the replication checks have nothing to verify
  # (and they reject the loops' constant initial carries).
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)
  from jax.experimental.shard_map import shard_map  # jax < 0.7
  return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def chunk_length(n: int, d: int, chunk_bytes: int) -> int:
  """Matrices per batched root call: as many ``[d, d]`` float32 ones as fit in
  ``chunk_bytes``, at least one and at most ``n``."""
  return int(max(1, min(n, chunk_bytes // (4 * d * d))))


def _for_each_chunk(n: int, c: int, carry, body):
  """``carry = body(start, carry)`` for chunk starts covering ``[0, n)`` with chunks of ``c``.

  The starts are ``min(i c, n - c)``: the last chunk is shifted back to end at ``n``
  rather than padded, so it recomputes up to ``c - 1`` matrices of the one before
  (the same inputs give the same roots) and nothing is copied to pad the stack. A
  single chunk runs without a loop.
  """
  num = -(-n // c)
  if num == 1:
    return body(0, carry)
  return lax.fori_loop(0, num, lambda i, x: body(jnp.minimum(i * c, n - c), x), carry)


def _roots_of_rows(stack, rows, fn, chunk_bytes, normalizer):
  """``fn`` of the matrices ``stack[min(rows[j], n - 1)]``: ``([m, d, d], [m])``, chunk by chunk.

  The chunks are gathered one at a time from ``stack`` (and divided by
  ``normalizer``), so the temporaries of ``fn`` scale with the chunk.
  """
  n, d = stack.shape[0], stack.shape[1]
  m = rows.shape[0]
  c = chunk_length(m, d, chunk_bytes)

  def body(start, carry):
    idx = jnp.minimum(lax.dynamic_slice_in_dim(rows, start, c), n - 1)
    root, err = fn(jnp.take(stack, idx, axis=0) / normalizer)
    return (lax.dynamic_update_slice_in_dim(carry[0], root, start, 0),
            lax.dynamic_update_slice_in_dim(carry[1], err, start, 0))

  init = (jnp.zeros((m, d, d), jnp.float32), jnp.zeros((m,), jnp.float32))
  return _for_each_chunk(m, c, init, body)


def _split_roots(stack, fn, n_dev, index, chunk_bytes, normalizer):
  """This device's share of the roots: rows ``[index s, (index + 1) s)``, ``s = ceil(n / n_dev)``.

  Rows past the stack's end (the last device's share when ``n_dev`` does not divide
  ``n``) repeat its last matrix and are dropped after the gather.
  """
  share = -(-stack.shape[0] // n_dev)
  rows = index * share + jnp.arange(share)
  return _roots_of_rows(stack, rows, fn, chunk_bytes, normalizer)


def batched_inverse_pth_roots(stack: jnp.ndarray, p: int, *, axis_name: Optional[str] = None,
                              mesh: Optional[jax.sharding.Mesh] = None,
                              mesh_axis_name: str = "batch",
                              chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                              normalizer: Any = 1.0, **root_kwargs
                              ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """`matrix_inverse_pth_root` of every matrix of ``stack / normalizer``: ``([n, d, d], [n])``.

  The matrices are taken ``chunk_length(., d, chunk_bytes)`` at a time (one
  `jax.vmap` per chunk, in a loop), so the eigendecompositions' temporaries are a few
  chunks, not a few stacks; the normalizer (a bias correction, say) is applied per
  chunk for the same reason. Each matrix's root does not depend on the chunking.

  * Neither ``axis_name`` nor ``mesh``: all chunks on this device.
  * ``axis_name`` (inside `jax.pmap` or `shard_map` over that axis): each device
    computes a contiguous share of ``ceil(n / devices)`` matrices and `lax.all_gather`
    reassembles them.
  * ``mesh`` (plain `jax.jit`): the same shares in a `shard_map` over
    ``mesh_axis_name`` (the stack goes in replicated, nothing is padded), then
    constrained back to replicated.

  ``root_kwargs`` are `matrix_inverse_pth_root`'s keyword arguments.
  """
  fn = jax.vmap(functools.partial(matrix_inverse_pth_root, p=p, **root_kwargs))
  n = stack.shape[0]
  if axis_name is not None:
    root, err = _split_roots(stack, fn, _axis_size(axis_name), lax.axis_index(axis_name),
                             chunk_bytes, normalizer)
    root = lax.all_gather(root, axis_name, tiled=True)
    err = lax.all_gather(err, axis_name, tiled=True)
    return root[:n], err[:n]
  if mesh is not None:
    n_dev = mesh.shape[mesh_axis_name]
    local = lambda s, z: _split_roots(s, fn, n_dev, lax.axis_index(mesh_axis_name),
                                      chunk_bytes, z)
    split, whole = PartitionSpec(mesh_axis_name), PartitionSpec()
    root, err = _shard_map(local, mesh, in_specs=(whole, whole),
                           out_specs=(split, split))(stack, jnp.asarray(normalizer,
                                                                        jnp.float32))
    replicated = NamedSharding(mesh, PartitionSpec())
    root = lax.with_sharding_constraint(root, replicated)
    err = lax.with_sharding_constraint(err, replicated)
    return root[:n], err[:n]
  return _roots_of_rows(stack, jnp.arange(n), fn, chunk_bytes, normalizer)


def refresh_roots(stack: jnp.ndarray, old_roots: jnp.ndarray, p: int, *,
                  threshold: float, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                  normalizer: Any = 1.0, axis_name: Optional[str] = None,
                  mesh: Optional[jax.sharding.Mesh] = None, **root_kwargs) -> jnp.ndarray:
  r"""The roots of ``stack / normalizer``, each kept only if valid, else the old one.

  .. math:: P_j \leftarrow 	ext{root}(L_j / z) \ 	ext{if}\ 	ext{error}_j < 	ext{threshold}
            \ 	ext{else}\ P_j

  (`root_is_valid`). On one device the new roots are written chunk by chunk into
  ``old_roots``' buffer (which a donated state lets XLA update in place), so no
  second stack of roots is made; split over devices, the gathered roots are selected
  against the old ones. ``root_kwargs``: as in `batched_inverse_pth_roots`.
  """
  if axis_name is not None or mesh is not None:
    root, err = batched_inverse_pth_roots(stack, p, axis_name=axis_name, mesh=mesh,
                                          chunk_bytes=chunk_bytes, normalizer=normalizer,
                                          **root_kwargs)
    return jnp.where(root_is_valid(err, threshold)[:, None, None], root, old_roots)
  root_kwargs.pop("mesh_axis_name", None)
  fn = jax.vmap(functools.partial(matrix_inverse_pth_root, p=p, **root_kwargs))
  n, d = stack.shape[0], stack.shape[1]
  c = chunk_length(n, d, chunk_bytes)

  def body(start, roots):
    root, err = fn(lax.dynamic_slice_in_dim(stack, start, c) / normalizer)
    old = lax.dynamic_slice_in_dim(roots, start, c)
    new = jnp.where(root_is_valid(err, threshold)[:, None, None], root, old)
    return lax.dynamic_update_slice_in_dim(roots, new, start, 0)

  return _for_each_chunk(n, c, old_roots, body)
