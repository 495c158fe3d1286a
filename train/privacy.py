"""DP-SGD's settings resolved against the data, and its privacy accounting.

`resolve(cfg, num_sequences)` fixes what the run's privacy rests on: the Poisson
sampling rate q (each of the train split's N sequences joins a step's batch with
probability q = expected_batch_size / N), the noise multiplier sigma (given, or derived
from a target epsilon for train.steps steps), the clip norm and delta. The accountant is
Google's `dp_accounting` (Renyi DP of the Poisson-subsampled Gaussian mechanism, composed
over the steps taken), the analysis DP-SGD's sampling and noise are built to match
(train/data/poisson.py, train/dp_sgd.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math

from dp_accounting import dp_event, mechanism_calibration, rdp
from scipy import stats

from train.config import Config
from train.errors import ConfigError

OVERFLOW = 1e-6  # the default expected batch overflows train.batch_size this rarely
MAX_NOISE = 1e4  # the noise multipliers a target epsilon is searched among: (0, MAX_NOISE]


def step_event(noise_multiplier: float, sampling_rate: float) -> dp_event.DpEvent:
    """One DP-SGD step: the Gaussian mechanism on a Poisson-sampled batch."""
    return dp_event.PoissonSampledDpEvent(sampling_rate,
                                          dp_event.GaussianDpEvent(noise_multiplier))


def epsilon_after(steps: int, noise_multiplier: float, sampling_rate: float,
                  delta: float) -> float:
    """Epsilon at `delta` spent by `steps` DP-SGD steps (inf without noise)."""
    if steps == 0:
        return 0.0
    accountant = rdp.RdpAccountant()
    accountant.compose(step_event(noise_multiplier, sampling_rate), steps)
    return accountant.get_epsilon(delta)


def noise_for(epsilon: float, steps: int, sampling_rate: float, delta: float,
              where: str) -> float:
    """The smallest noise multiplier that spends at most `epsilon` at `delta` in `steps`
    steps; a ConfigError when no multiplier up to MAX_NOISE does (Renyi DP's conversion
    has a floor for a given delta)."""
    def event(sigma: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(step_event(sigma, sampling_rate), steps)

    floor = epsilon_after(steps, MAX_NOISE, sampling_rate, delta)
    if floor > epsilon:
        raise ConfigError(f"privacy.epsilon={epsilon:g} is unreachable in {where}: even "
                          f"noise_multiplier={MAX_NOISE:g} spends epsilon={floor:.4g} at "
                          f"delta={delta:g}; raise privacy.epsilon or privacy.delta")
    return mechanism_calibration.calibrate_dp_mechanism(
        rdp.RdpAccountant, event, epsilon, delta,
        mechanism_calibration.ExplicitBracketInterval(0.0, MAX_NOISE), tol=1e-6)


def default_expected_batch(batch_size: int, num_sequences: int) -> float:
    """The largest expected batch whose Poisson-sampled size exceeds `batch_size` with
    probability at most OVERFLOW per step."""
    if num_sequences <= batch_size:
        return float(num_sequences)
    lo, hi = 0.0, float(batch_size)
    for _ in range(60):
        mid = (lo + hi) / 2
        if stats.binom.sf(batch_size, num_sequences, mid / num_sequences) <= OVERFLOW:
            lo = mid
        else:
            hi = mid
    return lo


@dataclasses.dataclass(frozen=True)
class Privacy:
    """A run's resolved DP-SGD settings (what a checkpoint records and a resume must
    keep) and its accountant."""

    num_sequences: int  # N: the train split's sequences, the population sampled from
    expected_batch: float  # q * N
    noise_multiplier: float  # sigma
    clip_norm: float  # C
    delta: float

    @property
    def sampling_rate(self) -> float:
        return self.expected_batch / self.num_sequences

    @property
    def noise_std(self) -> float:
        """The std of the Gaussian noise added to the summed clipped gradients."""
        return self.noise_multiplier * self.clip_norm

    @functools.cached_property
    def _one_step(self) -> tuple:
        """(orders, Renyi DP of one step at each): steps compose by adding them up."""
        accountant = rdp.RdpAccountant()
        accountant.compose(step_event(self.noise_multiplier, self.sampling_rate))
        return accountant.orders, accountant.rdp

    def epsilon(self, steps: int) -> float:
        """Epsilon at delta after `steps` steps (what epsilon_after computes, from the
        one step's Renyi DP computed once: a metrics row costs microseconds)."""
        if steps == 0:
            return 0.0
        orders, rdp_one = self._one_step
        return rdp.rdp_privacy_accountant.compute_epsilon(orders, rdp_one * steps,
                                                          self.delta)[0]

    def record(self) -> dict:
        """What a checkpoint stores, and a resumed run compares."""
        return dataclasses.asdict(self)

    def describe(self, steps: int) -> str:
        eps = self.epsilon(steps)
        return (f"DP-SGD: each of {self.num_sequences:,} sequences sampled with probability "
                f"{self.sampling_rate:.4g} per step (expected batch {self.expected_batch:.4g}),"
                f" clipped to norm {self.clip_norm:g}, noise multiplier "
                f"{self.noise_multiplier:.4g}; after {steps} steps epsilon = {eps:.4g} at "
                f"delta = {self.delta:g}")


def resolve(cfg: Config, num_sequences: int) -> Privacy:
    """The run's Privacy over a train split of `num_sequences` sequences; ConfigError for
    a delta that protects no one (>= 1/N) or an unreachable epsilon."""
    p, t = cfg.privacy, cfg.train
    delta = p.target_delta
    if delta * num_sequences >= 1:
        raise ConfigError(f"privacy.delta={delta:g} is not below 1 / {num_sequences:,} (the "
                          "train split's sequences): a mechanism that publishes one sequence "
                          f"whole would meet it; set privacy.delta below {1 / num_sequences:.2g}")
    expected = p.expected_batch_size
    if expected is None:
        expected = default_expected_batch(t.batch_size, num_sequences)
    elif expected > num_sequences:
        raise ConfigError(f"privacy.expected_batch_size={expected:g} exceeds the "
                          f"{num_sequences:,} sequences of the train split; lower it")
    sigma = p.noise_multiplier
    if sigma is None:
        sigma = noise_for(p.epsilon, t.steps, expected / num_sequences, delta,
                          f"train.steps={t.steps} steps at sampling rate "
                          f"{expected / num_sequences:.4g}")
    return Privacy(num_sequences, float(expected), float(sigma), p.clip, delta)


def for_run(cfg: Config, data_path: str | None) -> Privacy | None:
    """The run's DP-SGD settings over its train split (None without privacy.dp_sgd)."""
    if not cfg.privacy.dp_sgd:
        return None
    from train.data.batches import open_split
    return resolve(cfg, len(open_split(cfg, data_path, "train")))


def check_resume(saved: dict | None, now: Privacy | None, where: str) -> None:
    """A ConfigError when a run resumes with other privacy settings than its checkpoint
    was trained with (the spent budget assumes the same every step): DP-SGD turned on or
    off, or a changed sampling rate, noise, clip norm or delta."""
    now_record = None if now is None else now.record()
    if saved == now_record:
        return
    if saved is None or now_record is None:
        was, is_ = ("without", "with") if saved is None else ("with", "without")
        raise ConfigError(f"{where} was trained {was} DP-SGD and this run is {is_} it: the "
                          "privacy budget covers a run trained one way; set privacy as it was, "
                          f"or start a new output_dir from its weights (model.init_from)")
    changed = [f"{k} {saved.get(k)} -> {now_record[k]}" for k in now_record
               if not _same(saved.get(k), now_record[k])]
    if not changed:
        return
    raise ConfigError(f"{where} was trained with other privacy settings ({', '.join(changed)}): "
                      "the budget spent assumes the same every step; resume with the saved "
                      "ones (with a target epsilon: privacy.noise_multiplier="
                      f"{saved.get('noise_multiplier')}) or start a new output_dir")


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12)
    return a == b
