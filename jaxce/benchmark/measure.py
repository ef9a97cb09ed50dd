"""Compilation, compiled memory, interleaved timing and the copy roofline."""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclass
class Compiled:
  fn: Callable[..., Any]  # the compiled executable
  memory: dict[str, int] | None  # from memory_analysis(), None if unsupported
  compile_s: float  # lowering + compilation, seconds


def memory_stats(compiled) -> dict[str, int] | None:
  """The compiled executable's memory_analysis() as a dict of byte counts."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if isinstance(stats, (list, tuple)):
    stats = stats[0] if stats else None
  if stats is None:
    return None
  fields = ("temp", "argument", "output", "alias", "generated_code")
  out = {}
  for f in fields:
    v = getattr(stats, f"{f}_size_in_bytes", None)
    if v is not None:
      out[f"{f}_bytes"] = int(v)
  return out


def compile_jit(f: Callable[..., Any], args: Sequence[Any]) -> Compiled:
  """jax.jit(f).lower(*args).compile(): the executable that is timed is the
  one whose memory is reported."""
  t0 = time.perf_counter()
  compiled = jax.jit(f).lower(*args).compile()
  return Compiled(compiled, memory_stats(compiled), time.perf_counter() - t0)


def value_and_grad(loss: Callable[..., Any], argnums) -> Callable[..., Any]:
  return jax.value_and_grad(loss, argnums=argnums)


def copy_fn(x):
  """The roofline op: one read and one write of `x` (x * 2 is exact, and not
  simplified away like x * 1 could be)."""
  return x * jnp.asarray(2, x.dtype)


def copy_inplace_fn(x):
  """The in-place roofline op (compiled with x donated): -x into x's buffer."""
  return -x


def compile_donated(f: Callable[..., Any], x) -> Compiled:
  t0 = time.perf_counter()
  compiled = jax.jit(f, donate_argnums=0).lower(x).compile()
  return Compiled(compiled, memory_stats(compiled), time.perf_counter() - t0)


class InPlaceCopy:
  """Calls a donated `copy_inplace_fn` on a private copy of x, feeding each
  output back as the next input: a read and a write of x's size with no
  fresh allocation. On CPU a fresh output of 32 MiB or more is a new mmap that
  page-faults on every call, so `x * 2` there measures the allocator as much
  as memory; this measures the memory."""

  def __init__(self, compiled: Compiled, x):
    self.fn = compiled.fn
    self.buf = jnp.copy(x)

  def __call__(self):
    with warnings.catch_warnings():  # backends without donation just copy
      warnings.simplefilter("ignore")
      self.buf = self.fn(self.buf)
    return self.buf


def run_once(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, float]:
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def round_order(names: Sequence[str], r: int, seed: int = 0) -> list[str]:
  """The order of round `r`: a permutation of `names` drawn afresh each round
  from (`seed`, `r`), so that no implementation always runs first or right
  after the same neighbour. A rotation would keep the neighbours, and what
  ran before matters: a call that frees a large output decides whether the
  next one's output reuses those pages or faults in fresh ones. On CPU at
  16384 x 1000 a rotation put one kernel at 0.91-0.92x another where
  shuffled rounds measured 0.94-1.00x."""
  order = list(names)
  random.Random(seed * 1_000_003 + r).shuffle(order)
  return order


def round_robin(
    units: dict[str, tuple[Callable[..., Any], Sequence[Any]]],
    warmup: int,
    repeats: int,
    on_round: Callable[[int, int], None] | None = None,
    seed: int = 0,
) -> dict[str, list[float]]:
  """Times every unit once per round, `warmup` untimed rounds then `repeats`
  timed ones, in an order shuffled each round (`round_order`). Each call is
  followed by block_until_ready; its output is dropped before the next call.

  Returns unit name -> per-round seconds (aligned: index r is round r).
  """
  names = list(units)
  times: dict[str, list[float]] = {name: [] for name in names}
  total = warmup + repeats
  for r in range(total):
    if on_round is not None:
      on_round(r, total)
    for name in round_order(names, r, seed):
      fn, args = units[name]
      dt = run_once(fn, args)[1]  # (the output freed here, before the next call)
      if r >= warmup:
        times[name].append(dt)
  return times


def median(xs: Sequence[float]) -> float | None:
  return statistics.median(xs) if xs else None


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float | None:
  """Median over rounds of num[r] / den[r]: both ran in the same round, so the
  ratio cancels most of the machine's slow drift and contention."""
  pairs = [a / b for a, b in zip(num, den, strict=False) if b > 0]
  return statistics.median(pairs) if pairs else None


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> dict[str, float] | None:
  """The spread of the same-round ratios num[r] / den[r]: median, min, max and
  the quartiles (statistics.quantiles' "inclusive" method: the min and max
  are the 0th and 100th percentiles, so it is defined from 2 rounds)."""
  pairs = sorted(a / b for a, b in zip(num, den, strict=False) if b > 0)
  if not pairs:
    return None
  q1, _, q3 = statistics.quantiles(pairs, n=4, method="inclusive") if len(pairs) > 1 else (
      pairs[0], pairs[0], pairs[0])
  return {"median": statistics.median(pairs), "min": pairs[0], "max": pairs[-1], "q1": q1,
          "q3": q3, "rounds": len(pairs)}


def positive_ints(sep: str, count: int | None = None) -> Callable[[str], tuple[int, ...]]:
  """An argparse `type` for a shape such as NxC (sep "x", count 2): `count`
  positive ints (None: one or more)."""

  def parse(text: str) -> tuple[int, ...]:
    try:
      values = tuple(int(v) for v in text.split(sep))
    except ValueError:
      values = ()
    if not values or (count is not None and len(values) != count) or min(values) < 1:
      how_many = "" if count is None else f"{count} "
      raise argparse.ArgumentTypeError(
          f"expected {how_many}positive integers separated by {sep!r}, got {text!r}")
    return values
  return parse


def positive_int(text: str) -> int:
  """An argparse `type` for counts such as --rounds: an int of at least 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
  return value


def max_abs_err(got, ref) -> float:
  return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))))


def grad_errors(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> tuple[float, float]:
  """(max abs error, max abs error / max |reference|) over all the parts; where
  the reference is 0 (one class) up to float64 rounding (at most
  `ZERO_GRADIENT`), the relative error is 0 if the gradient is too, else inf."""
  err = max(max_abs_err(g, r) for g, r in zip(got, ref, strict=True))
  scale = max(float(np.max(np.abs(r))) for r in ref)
  if scale > ZERO_GRADIENT:
    return err, err / scale
  return err, (0.0 if err <= ZERO_GRADIENT else float("inf"))


# A reference gradient no larger than this is 0: label smoothing's at one
# class came out 3.5e-18 in float64 (rounding), and jaxce's and optax's
# exact 0 read as a relative error of 1.0. float32 gradients of a mean over
# 2**24 positions are still about 6e-8.
ZERO_GRADIENT = 1e-12
