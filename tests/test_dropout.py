"""lm.dropout: the hash-based dropout keeps 1 - rate of the elements, scales them, and its
masks behave like independent Bernoulli draws (per element, per key)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_rate_and_scale(rate):
    x = jnp.ones((64, 128, 32))
    y = np.asarray(dropout(x, rate, jax.random.PRNGKey(3)))
    kept = y != 0
    n = kept.size
    # Binomial standard deviation of the kept fraction: sqrt(p (1 - p) / n).
    sd = np.sqrt(rate * (1 - rate) / n)
    assert abs(kept.mean() - (1 - rate)) < 5 * sd
    np.testing.assert_allclose(y[kept], 1.0 / (1.0 - rate), rtol=1e-6)


def test_masks_depend_on_key_only_and_look_independent():
    shape, rate = (256, 1024), 0.5
    a = np.asarray(keep_mask(jax.random.PRNGKey(0), shape, rate))
    a2 = np.asarray(keep_mask(jax.random.PRNGKey(0), shape, rate))
    b = np.asarray(keep_mask(jax.random.fold_in(jax.random.PRNGKey(0), 1), shape, rate))
    np.testing.assert_array_equal(a, a2)
    sd = np.sqrt(0.25 / a.size)
    # Two keys agree on half the elements, as independent fair coins do.
    assert abs((a == b).mean() - 0.5) < 5 * sd
    # Neighbouring elements (along rows and along columns) are uncorrelated.
    fa = a.astype(np.float64) - a.mean()
    for x, y in ((fa[:, 1:], fa[:, :-1]), (fa[1:], fa[:-1])):
        corr = (x * y).mean() / fa.var()
        assert abs(corr) < 5 / np.sqrt(x.size)


def test_module_matches_function_and_is_identity_when_deterministic():
    x = jnp.arange(1.0, 1001.0).reshape(10, 100)
    key = jax.random.PRNGKey(7)
    m = Dropout(0.25)
    np.testing.assert_array_equal(m.apply({}, x, deterministic=True), x)
    y = m.apply({}, x, deterministic=False, rngs={"dropout": key})
    assert 0 < int((y == 0).sum()) < x.size
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-6)
    assert dropout(x, 0.0, key) is x
    np.testing.assert_array_equal(dropout(x, 1.0, key), jnp.zeros_like(x))
