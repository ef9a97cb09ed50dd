"""Test set-up: 8 CPU devices for the sharding tests, and strict dtype and
rank promotion so that no implicit upcast or broadcast hides in the library."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
