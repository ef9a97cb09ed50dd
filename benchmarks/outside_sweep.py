"""jaxce against its peer on inputs the benchmark's sweep does not cover:
logits computed in the same jit, a label far below its row's max, float16,
second derivatives, short last axes, `where`, `jax.vmap`, the fused loss's
options; and `plain`, the integer-label call without options at the shape
of the first cases (4096 x 1024), for scale.

Each case's jaxce program and peer program (optax or plain JAX, written as a
user would) run interleaved in one process, the order shuffled each round;
the table gives the median of the same-round ratios jaxce / peer, their
range, and both programs' compiled temp memory.

  PYTHONPATH=. python benchmarks/outside_sweep.py                # every case, 7 rounds
  PYTHONPATH=. python benchmarks/outside_sweep.py --cases f16_ce hvp_rev --rounds 11
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxce
from jaxce.benchmark.measure import positive_int, ratio_stats, round_order

Case = tuple[str, Callable[..., Any], Callable[..., Any], tuple[Any, ...]]


def _int_inputs(n: int, c: int, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
  k = jax.random.split(jax.random.key(0), 2)
  return ((jax.random.normal(k[0], (n, c)) * 3).astype(dtype),
          jax.random.randint(k[1], (n,), 0, c))


def _optax_int(x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def _vg(f: Callable[..., Any], argnums: Any = 0) -> Callable[..., Any]:
  return jax.value_and_grad(f, argnums)


def _hvp_rev(f: Callable[..., Any]) -> Callable[..., Any]:
  return lambda x, y, v: jax.grad(lambda a: jnp.vdot(jax.grad(f)(a, y), v))(x)


def _hvp_fwd(f: Callable[..., Any]) -> Callable[..., Any]:
  return lambda x, y, v: jax.jvp(lambda a: jax.grad(f)(a, y), (x,), (v,))[1]


def cases() -> dict[str, Callable[[], Case]]:
  """Each builds (what, jaxce's function, the peer's, arguments)."""

  def plain() -> Case:
    x, y = _int_inputs(4096, 1024)
    return ("integer labels, no option (the scale for the cases at this shape),"
            " value_and_grad", _vg(jaxce.cross_entropy), _vg(_optax_int), (x, y))

  def producer() -> Case:
    x, y = _int_inputs(4096, 1024)
    return ("integer labels of x / 0.7 in the same jit, value_and_grad",
            _vg(lambda x, y: jaxce.cross_entropy(x / 0.7, y)),
            _vg(lambda x, y: _optax_int(x / 0.7, y)), (x, y))

  def far_label() -> Case:
    x, y = _int_inputs(4096, 1024)
    x = x.at[0, (y[0] + 1) % 1024].set(200.0)  # one row's label 190+ below its max
    return ("integer labels, one row's label far below its max, value_and_grad",
            _vg(jaxce.cross_entropy), _vg(_optax_int), (x, y))

  def f16_ce() -> Case:
    x, y = _int_inputs(4096, 1024, jnp.float16)
    return ("integer labels, float16 logits, value_and_grad",
            _vg(jaxce.cross_entropy), _vg(_optax_int), (x, y))

  def _bce(n: int, c: int, dtype: Any) -> Callable[[], Case]:
    def build() -> Case:
      x, _ = _int_inputs(n, c, dtype)
      return (f"binary_cross_entropy_with_logits, {n} x {c}, {jnp.dtype(dtype).name},"
              " value_and_grad", _vg(jaxce.binary_cross_entropy_with_logits),
              _vg(lambda x, t: optax.sigmoid_binary_cross_entropy(x, t).mean()),
              (x, (x > 0).astype(dtype)))
    return build

  def _hvp(order: str, hvp: Callable[..., Any]) -> Callable[[], Case]:
    def build() -> Case:
      x, y = _int_inputs(4096, 1024)
      v = jax.random.normal(jax.random.key(1), x.shape)
      return (f"integer labels, Hessian-vector product, {order}",
              hvp(jaxce.cross_entropy), hvp(_optax_int), (x, y, v))
    return build

  def where() -> Case:
    x, y = _int_inputs(4096, 1024)
    y, m = y % 1016, jnp.arange(1024) < 1016
    return ("integer labels with `where` (8 classes out), value_and_grad",
            _vg(lambda x, y: jaxce.cross_entropy(x, y, where=m)),
            _vg(lambda x, y: _optax_int(jnp.where(m, x, -jnp.inf), y)), (x, y))

  def vmap() -> Case:
    x, y = _int_inputs(16384, 1000)
    x, y = x.reshape(16, 1024, 1000), y.reshape(16, 1024)
    return ("integer labels under jax.vmap over 16 groups, value_and_grad",
            _vg(lambda x, y: jax.vmap(jaxce.cross_entropy)(x, y).mean()),
            _vg(lambda x, y: jax.vmap(_optax_int)(x, y).mean()), (x, y))

  def _linear(bias: bool, **kw: Any) -> Callable[[], Case]:
    def build() -> Case:
      k = jax.random.split(jax.random.key(0), 4)
      x = jax.random.normal(k[0], (1024, 128))
      w = jax.random.normal(k[1], (128, 16384)) / 128**0.5
      b = jax.random.normal(k[2], (16384,))
      y = jax.random.randint(k[3], (1024,), 0, 16384)
      cap = kw.get("softcap")

      def peer(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
        z = x @ w if b is None else x @ w + b
        return _optax_int(z if cap is None else cap * jnp.tanh(z / cap), y)

      options = ", ".join([*(f"{k}={v}" for k, v in kw.items()), *(["bias"] if bias else [])])
      return (f"linear_cross_entropy({options}), 1024 x 128 x 16384, value_and_grad against"
              " materialized logits",
              _vg(lambda x, w, b: jaxce.linear_cross_entropy(x, w, y, bias=b, **kw), (0, 1)),
              _vg(peer, (0, 1)), (x, w, b if bias else None))
    return build

  return {"plain": plain, "producer": producer, "far_label": far_label, "f16_ce": f16_ce,
          "f16_bce": _bce(2048, 1024, jnp.float16),
          "hvp_rev": _hvp("reverse over reverse", _hvp_rev),
          "hvp_fwd": _hvp("forward over reverse", _hvp_fwd),
          "bce_n1": _bce(262144, 1, jnp.float32),
          "where": where, "vmap": vmap, "linear_bias": _linear(True),
          "linear_forward_mode_softcap": _linear(False, forward_mode=True, softcap=30.0)}


def main() -> None:
  table = cases()
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", nargs="+", choices=sorted(table), default=list(table))
  p.add_argument("--rounds", type=positive_int, default=7)
  args = p.parse_args()
  print(f"# {jax.default_backend()}, jax {jax.__version__}, {args.rounds} rounds")
  print("| case | what | jaxce / peer (median) | rounds' range | jaxce | peer |"
        " temp MiB jaxce / peer |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for name in args.cases:
    what, ours, theirs, inputs = table[name]()
    compiled = {k: jax.jit(f).lower(*inputs).compile() for k, f in
                (("jaxce", ours), ("peer", theirs))}
    for c in compiled.values():
      jax.block_until_ready(c(*inputs))
    t0 = time.perf_counter()
    jax.block_until_ready(compiled["peer"](*inputs))
    calls = max(1, min(20, int(0.05 / max(time.perf_counter() - t0, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in compiled}
    for r in range(args.rounds):
      for k in round_order(list(compiled), r):
        t0 = time.perf_counter()
        for _ in range(calls):
          out = compiled[k](*inputs)
        jax.block_until_ready(out)
        times[k].append((time.perf_counter() - t0) / calls)
    stats = ratio_stats(times["jaxce"], times["peer"])
    assert stats is not None
    temp = {k: c.memory_analysis().temp_size_in_bytes / 2**20 for k, c in compiled.items()}
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    print(f"| {name} | {what} | {stats['median']:.2f} | {stats['min']:.2f}-{stats['max']:.2f} |"
          f" {med['jaxce']:.3f} ms | {med['peer']:.3f} ms |"
          f" {temp['jaxce']:.2f} / {temp['peer']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
