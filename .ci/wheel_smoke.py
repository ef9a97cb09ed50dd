"""Smoke test of an installed jaxce, run by .ci/wheel outside the repository.

Calls every public function once on small inputs and compares it with a float64
NumPy reference; fails if jaxce is imported from anywhere but the environment's
site-packages, or if a public name has no check here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
import subprocess
import sys
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np

import jaxce

site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
where = pathlib.Path(jaxce.__file__).resolve()
assert site in where.parents, f"jaxce imported from {where}, not from {site}"
assert (where.parent / "py.typed").is_file(), "py.typed is not installed"
meta = importlib.metadata.metadata("jaxce")
assert meta["Version"] == jaxce.__version__, (meta["Version"], jaxce.__version__)
assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]

checked: set[str] = set()


def close(name: str, got, want, tol: float = 1e-5) -> None:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name)
  checked.add(name)


rng = np.random.default_rng(0)
x = rng.normal(size=(4, 5)).astype(np.float32)
y = np.array([0, 3, 4, 1], np.int32)
t = rng.dirichlet(np.ones(5), size=4).astype(np.float32)
b = (rng.random((4, 5)) > 0.5).astype(np.float32)

x64 = x.astype(np.float64)
lse = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1)) + x64.max(-1)
logp = x64 - lse[:, None]
picked = -logp[np.arange(4), y]
softplus = lambda z: np.logaddexp(0.0, z)
bce = b * softplus(-x64) + (1 - b) * softplus(x64)

close("log_softmax", jaxce.log_softmax(x), logp)
close("logsumexp", jaxce.logsumexp(x), lse)
y_ignored = y.copy()
y_ignored[1] = -100
close("cross_entropy", jaxce.cross_entropy(x, y_ignored), picked[[0, 2, 3]].mean())
close("cross_entropy", jaxce.cross_entropy(x, t, reduction="none"), -(t * logp).sum(-1))
close("nll_loss", jaxce.nll_loss(jaxce.log_softmax(x), y, reduction="sum"), picked.sum())
close("binary_cross_entropy_with_logits", jaxce.binary_cross_entropy_with_logits(x, b),
      bce.mean())
close("softmax_cross_entropy", jaxce.softmax_cross_entropy(x, t), -(t * logp).sum(-1))
close("softmax_cross_entropy_with_integer_labels",
      jaxce.softmax_cross_entropy_with_integer_labels(x, y), picked)
close("sigmoid_binary_cross_entropy", jaxce.sigmoid_binary_cross_entropy(x, b), bce)
p = 1.0 / (1.0 + np.exp(-x64))
close("binary_cross_entropy", jaxce.binary_cross_entropy(p.astype(np.float32), b),
      -(b * np.log(p) + (1 - b) * np.log1p(-p)).mean())

h = rng.normal(size=(6, 3)).astype(np.float32)
w = rng.normal(size=(3, 7)).astype(np.float32)
labels = np.array([0, 6, 2, 3, 5, 1], np.int32)
z = h.astype(np.float64) @ w.astype(np.float64)
z_lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
close("linear_cross_entropy", jaxce.linear_cross_entropy(h, w, labels, chunk_size=4),
      (z_lse - z[np.arange(6), labels]).mean())

# Gradient: (softmax - one_hot) / N for the mean loss.
grad = jax.jit(jax.grad(jaxce.cross_entropy))(x, y)
close("grad", grad, (np.exp(logp) - np.eye(5)[y]) / 4)

step = jaxce.checked.raising(jax.jit(lambda a, b: jaxce.checked.cross_entropy(a, b)))
close("checked.cross_entropy", step(x, y), picked.mean())
nll = jaxce.checked.raising(lambda a, b: jaxce.checked.nll_loss(a, b, reduction="none"))
close("checked.nll_loss", nll(jnp.asarray(logp, jnp.float32), y), picked)
try:
  step(x, np.array([0, 9, 1, 2], np.int32))
except Exception as err:  # JaxRuntimeError
  if "label 9" not in str(err):
    raise AssertionError(f"checked.cross_entropy: unexpected error {err!r}") from err
else:
  raise AssertionError("checked.cross_entropy accepted label 9 of 5 classes")
lin = jaxce.checked.raising(jaxce.checked.linear_cross_entropy)
close("checked.linear_cross_entropy", lin(h, w, labels), (z_lse - z[np.arange(6), labels]).mean())
drop_in = jaxce.checked.raising(jaxce.checked.softmax_cross_entropy_with_integer_labels)
close("checked.softmax_cross_entropy_with_integer_labels", drop_in(x, y), picked)
checked.update({"checked.raising", "checked.check_labels"})  # raising calls check_labels

public = {n for n in jaxce.__all__ if n != "checked"}
public |= {f"checked.{n}" for n in jaxce.checked.__all__}
missing = public - checked
assert not missing, f"no smoke test for {sorted(missing)}"

if importlib.util.find_spec("jaxce.benchmark") is not None:
  subprocess.run([sys.executable, "-m", "jaxce.benchmark", "--help"], check=True,
                 stdout=subprocess.DEVNULL)
  # A short real run of the installed benchmark: table, results.json and a plot.
  out = pathlib.Path("bench-out")
  table = subprocess.run(
      [sys.executable, "-m", "jaxce.benchmark", "--quick", "--cases", "nll,ce_nchw",
       "--dtypes", "float32", "--out", str(out)],
      check=True, capture_output=True, text=True).stdout
  assert "jaxce / peer" in table, table
  assert (out / "results.json").stat().st_size, "empty results.json"
  assert (out / "ratio_float32.png").stat().st_size, "empty plot"
  checked.add("python -m jaxce.benchmark --quick")

print(f"wheel smoke test passed: jaxce {jaxce.__version__} from {where.parent},"
      f" {len(checked)} checks")
