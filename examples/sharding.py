"""Sharded losses with jaxce: data parallel, vocab parallel, multi-host.

An LM-head-like problem: activations `x` [N, D], a kernel [D, V], the logits
`x @ kernel` [N, V] and integer labels [N] (-100 marks padding). Each section
spreads the loss over devices and compares it with the loss on one device:

1. `data_parallel`: the batch split over a "data" axis under `jax.jit`;
   the loss call does not change.
2. `vocab_parallel_jit`: on an Explicit 2 x 4 ("data", "model") mesh, the
   kernel's vocabulary split over "model" and the rows over "data".
   `linear_cross_entropy` reads the split from the arrays' types and works
   per device: no device ever holds the whole kernel or a whole row of
   logits, and the kernel's gradient comes out split like the kernel.
3. `vocab_parallel_shard_map`: inside `jax.shard_map`, for code that already
   runs per device (Megatron-style tensor parallelism): each device passes
   its slice of the classes, the global labels and `class_axis_name="model"`.
4. `multi_host`: section 2's code unchanged, on a mesh that spans several
   processes, after `jax.distributed.initialize()`. It runs only when
   JAX_COORDINATOR_ADDRESS, JAXCE_NUM_PROCESSES and JAXCE_PROCESS_ID are
   set. On each of the P hosts (host0 runs process 0; any free port):

     JAX_COORDINATOR_ADDRESS=host0:12345 JAXCE_NUM_PROCESSES=P \\
       JAXCE_PROCESS_ID=i python examples/sharding.py      # i = 0 .. P-1

   (On Cloud TPU and SLURM, `jax.distributed.initialize()` with no
   arguments finds all three.) The mesh is P x (devices per host): "data"
   across hosts, "model" within each. Every host builds the same full arrays
   here; a real data loader would have each host load only its rows and
   assemble them with `jax.make_array_from_process_local_data`.

   To try it on one machine with two processes of 4 CPU devices each:

     for i in 0 1; do XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
       JAX_COORDINATOR_ADDRESS=localhost:12345 JAXCE_NUM_PROCESSES=2 \\
       JAXCE_PROCESS_ID=$i python examples/sharding.py & done; wait

Run:  python examples/sharding.py   (it simulates 8 CPU devices unless
XLA_FLAGS already sets a device count).
"""

from __future__ import annotations

import functools
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

import jaxce

N, D, V = 64, 32, 256  # tokens, hidden size, vocabulary
IGNORE = -100


def make_data(seed: int = 0):
  """x [N, D], kernel [D, V], labels [N] and class weights [V], as NumPy
  arrays (the same on every process)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, D)).astype(np.float32)
  kernel = (rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
  labels = rng.integers(0, V, size=N).astype(np.int32)
  labels[::7] = IGNORE  # some padding
  weight = rng.uniform(0.5, 2.0, size=V).astype(np.float32)
  return x, kernel, labels, weight


def to_float(loss) -> float:
  """A replicated scalar as a Python float. On several processes each reads
  its own copy (float(loss) would need every device to be local)."""
  return float(loss.addressable_data(0))


# ---------------------------------------------------------------------------
# 1. Data parallel: the batch split over "data" under jit.


def data_parallel():
  x, kernel, labels, _ = make_data()
  logits = x @ kernel
  reference = jax.jit(jaxce.cross_entropy)(logits, labels)  # on one device

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  logits = jax.device_put(logits, jax.NamedSharding(mesh, jax.P("data")))
  labels = jax.device_put(labels, jax.NamedSharding(mesh, jax.P("data")))
  loss, grad = jax.jit(jax.value_and_grad(jaxce.cross_entropy))(logits, labels)

  return {"loss": to_float(loss), "single_device": float(reference),
          "grad_sharding": grad.sharding.spec}


# ---------------------------------------------------------------------------
# 2. Vocab parallel under jit on an Explicit mesh: the kernel split over "model".


def vocab_parallel_jit(mesh_shape=(2, 4)):
  x, kernel, labels, _ = make_data()
  reference = jax.jit(jaxce.linear_cross_entropy)(x, kernel, labels)  # on one device

  mesh = jax.make_mesh(mesh_shape, ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)  # the default, spelled out
  with jax.set_mesh(mesh):
    x = jax.device_put(x, jax.P("data", None))
    kernel = jax.device_put(kernel, jax.P(None, "model"))
    labels = jax.device_put(labels, jax.P("data"))
    loss, grads = jax.jit(jax.value_and_grad(jaxce.linear_cross_entropy, (0, 1)))(
        x, kernel, labels)

  return {"loss": to_float(loss), "single_device": float(reference),
          "grad_sharding": jax.typeof(grads[1]).sharding.spec}


# ---------------------------------------------------------------------------
# 3. Vocab parallel inside shard_map: class_axis_name.


def vocab_parallel_shard_map():
  x, kernel, labels, weight = make_data()
  logits = x @ kernel
  reference = jax.jit(functools.partial(jaxce.cross_entropy, label_smoothing=0.1,
                                        reduction="sum"))(logits, labels, weight=weight)

  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

  # Each device: its rows' [N / 2, V / 4] slice of the logits, the matching
  # [V / 4] slice of the class weights, and its rows' global labels.
  def local_loss(logits_slice, labels, weight_slice):
    loss = jaxce.cross_entropy(logits_slice, labels, weight=weight_slice,
                               label_smoothing=0.1, reduction="sum", class_axis_name="model")
    return jax.lax.psum(loss, "data")

  loss = jax.shard_map(local_loss, mesh=mesh, out_specs=jax.P(),
                       in_specs=(jax.P("data", "model"), jax.P("data"), jax.P("model")))(
      logits, labels, weight)

  # The fused loss, per device on its [D, V / 4] kernel slice. reduction="mean"
  # would average this device's rows only: for the batch mean, sum and count
  # over "data".
  def local_mean(x_rows, kernel_slice, labels):
    total = jaxce.linear_cross_entropy(x_rows, kernel_slice, labels, reduction="sum",
                                       class_axis_name="model")
    count = jnp.sum(labels != IGNORE).astype(total.dtype)
    total, count = jax.lax.psum((total, count), "data")
    return total / jnp.maximum(count, 1.0)

  mean_loss, kernel_grad = jax.jit(jax.value_and_grad(jax.shard_map(
      local_mean, mesh=mesh, out_specs=jax.P(),
      in_specs=(jax.P("data", None), jax.P(None, "model"), jax.P("data"))), argnums=1))(
          x, kernel, labels)

  return {"loss": to_float(loss), "single_device": float(reference),
          "mean_loss": to_float(mean_loss),
          "mean_single_device": float(jax.jit(jaxce.linear_cross_entropy)(x, kernel, labels)),
          "grad_sharding": kernel_grad.sharding.spec}


# ---------------------------------------------------------------------------
# 4. Multi-host: section 2 on a mesh spanning processes.

MULTI_HOST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAXCE_NUM_PROCESSES", "JAXCE_PROCESS_ID")


def multi_host_requested() -> bool:
  return all(os.environ.get(k) for k in MULTI_HOST_ENV)


def multi_host():
  """Every process runs this. `jax.distributed.initialize` must come before
  anything else touches the devices."""
  jax.distributed.initialize(
      coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(os.environ["JAXCE_NUM_PROCESSES"]),
      process_id=int(os.environ["JAXCE_PROCESS_ID"]))
  # N must divide by the number of processes, V by the devices per process.
  return vocab_parallel_jit(mesh_shape=(jax.process_count(), jax.local_device_count()))


def main():
  if multi_host_requested():
    sections = [multi_host]
  else:
    sections = [data_parallel, vocab_parallel_jit, vocab_parallel_shard_map]
  for section in sections:
    result = section()
    lines = [f"loss {result['loss']:.6f}   single device {result['single_device']:.6f}"]
    if "mean_loss" in result:
      lines.append(f"linear mean loss {result['mean_loss']:.6f}   single device"
                   f" {result['mean_single_device']:.6f}")
    print(f"[process {jax.process_index()}] {section.__name__} on {jax.device_count()} devices"
          f" (gradient sharding {result['grad_sharding']})")
    for line in lines:
      print("    " + line)
  if not multi_host_requested():
    print(f"(set {', '.join(MULTI_HOST_ENV)} to run multi_host)")


if __name__ == "__main__":
  main()
