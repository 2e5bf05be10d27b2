"""The forgetting-law fit: recovers A and β from synthetic noisy data, inside its bootstrap intervals."""
import numpy as np
import pytest

from agl.scaling import fit_forgetting_law, forgetting_law


@pytest.mark.parametrize("A,beta,seed", [(2e-3, 0.55, 0), (0.05, 0.3, 1), (1e-4, 0.8, 2)])
def test_recovers_A_beta_with_noise(A, beta, seed):
    rng = np.random.default_rng(seed)
    D = np.logspace(3, 6, 40)
    y = forgetting_law(D, A, beta) * np.exp(rng.normal(0, 0.05, D.size))
    fit = fit_forgetting_law(D, y, n_boot=300, seed=seed)
    assert fit.A_ci[0] <= A <= fit.A_ci[1]
    assert fit.beta_ci[0] <= beta <= fit.beta_ci[1]
    assert abs(fit.beta - beta) < 0.05
    assert abs(np.log(fit.A / A)) < 0.5
    assert fit.A_ci[0] < fit.A < fit.A_ci[1] and fit.beta_ci[0] < fit.beta < fit.beta_ci[1]
    assert fit.n_boot > 250 and fit.r2_log > 0.9


def test_with_offset_recovers_E():
    """A negative offset makes the small-D losses negative: the plain power law cannot fit them (it rejects them),
    the law with an offset recovers E and β."""
    rng = np.random.default_rng(3)
    D = np.logspace(2, 5, 50)
    y = forgetting_law(D, 0.01, 0.5, E=-0.15) + rng.normal(0, 0.005, D.size)  # A·D^β + E < 0 for D < 225
    assert (y < 0).sum() >= 5
    with pytest.raises(ValueError, match="<= 0"):
        fit_forgetting_law(D, y, n_boot=0)
    fit = fit_forgetting_law(D, y, with_offset=True, n_boot=200)
    assert abs(fit.beta - 0.5) < 0.08
    assert abs(fit.E + 0.15) < 0.05
    assert fit.E_ci[0] <= -0.15 <= fit.E_ci[1] and fit.E_ci[1] < 0
    assert fit.beta_ci[0] <= 0.5 <= fit.beta_ci[1]


def test_intervals_separate_two_laws():
    rng = np.random.default_rng(4)
    D = np.logspace(3, 6, 30)
    steep = fit_forgetting_law(D, forgetting_law(D, 1e-3, 0.6) * np.exp(rng.normal(0, 0.05, D.size)), n_boot=200)
    flat = fit_forgetting_law(D, forgetting_law(D, 1e-3, 0.3) * np.exp(rng.normal(0, 0.05, D.size)), n_boot=200)
    assert flat.beta_ci[1] < steep.beta_ci[0]


def test_bad_input_errors():
    D = np.array([1e3, 2e3, 4e3, 8e3])
    with pytest.raises(ValueError, match="<= 0"):
        fit_forgetting_law(D, [0.1, -0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="tokens` must be positive"):
        fit_forgetting_law([0, 1, 2, 3], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_forgetting_law([1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="has 4 values"):
        fit_forgetting_law(D, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        fit_forgetting_law(D, [0.1, np.nan, 0.3, 0.4])
    with pytest.raises(ValueError, match="distinct"):
        fit_forgetting_law([5, 5, 5], [0.1, 0.2, 0.3])
    # negative values are fine with an offset
    fit = fit_forgetting_law(D, [-0.01, 0.02, 0.05, 0.09], with_offset=True, n_boot=0)
    assert np.isfinite(fit.beta) and np.isnan(fit.A_ci[0])
