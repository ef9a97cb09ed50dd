"""`assert_same`: arrays equal in where they are NaN, +inf and -inf, and
close elsewhere (the fused passes against the exact statistics)."""

import numpy as np


def assert_same(got, want, rtol=2e-6):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  fin = np.isfinite(want)
  np.testing.assert_allclose(got[fin], want[fin], rtol=rtol, atol=rtol)
