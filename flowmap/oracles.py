r"""Analytic teachers for tests and benchmarks: closed-form velocities and flow maps.

* :class:`GaussianTarget` — data :math:`x_1 \sim N(\mu, \mathrm{diag}(c^2))`. With
  :math:`m_t = \alpha_t\mu` and :math:`v_t = \alpha_t^2 c^2 + \sigma_t^2`,

  .. math:: b_t(x) = \dot\alpha_t\mu + \frac{\alpha_t\dot\alpha_t c^2 + \sigma_t\dot\sigma_t}{v_t}(x - m_t),
            \qquad X(s,t,x) = m_t + \sqrt{v_t/v_s}\,(x - m_s).

* :class:`GaussianMixtureTarget` — :math:`\sum_k \pi_k N(\mu_k, \mathrm{diag}(c_k^2))`; the exact
  velocity is the posterior-weighted sum of the component velocities, weights
  :math:`\propto \pi_k N(x; \alpha_t\mu_k, v^k_t)`. A teacher with no training error; its flow map
  comes from a tight adaptive solve.

* :class:`ClassConditionalMixture` — each class :math:`c` its own Gaussian mixture, with class
  prior :math:`p_c`. The conditional velocity :math:`b(x, t \mid c)` is the exact velocity of class
  :math:`c`'s mixture, the unconditional :math:`b(x, t \mid \varnothing)` that of the union of
  every class's components (weights :math:`p_c\pi^c_k`), and the guided
  :math:`b^w = b(\varnothing) + w\,(b(c) - b(\varnothing))` is exact too.

All are :class:`~flowmap.protocols.Velocity` teachers: ``target(x, t)`` is :math:`b_t(x)`
(``target(x, t, y=labels, w=scales)`` for the class-conditional one).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowmap.conditioning import NULL_CLASS, Conditioning, as_scales, guided_velocity
from flowmap.ode import solve_adaptive
from flowmap.paths import AffinePath, Schedule, as_time, expand_like

__all__ = ["GaussianTarget", "GaussianMixtureTarget", "ClassConditionalMixture"]


class GaussianTarget:
    """Closed-form velocity and flow map for a diagonal Gaussian data distribution."""

    def __init__(self, mu: Tensor, c: Tensor, schedule: str | Schedule = "linear") -> None:
        self.mu, self.c = torch.as_tensor(mu), torch.as_tensor(c)
        self.path = AffinePath(schedule)

    def _moments(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k = self.path.coefficients(as_time(t, x), x)
        mu, c2 = self.mu.to(x), self.c.to(x) ** 2
        m = k.alpha * mu
        v = k.alpha**2 * c2 + k.sigma**2
        dv_half = k.alpha * k.d_alpha * c2 + k.sigma * k.d_sigma
        return m, v, k.d_alpha * mu, dv_half

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        r""":math:`b_t(x)`."""
        m, v, dm, dv_half = self._moments(t, x)
        return dm + dv_half / v * (x - m)

    __call__ = velocity  # a Velocity: b(x, t)

    def flow_map(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
        r""":math:`X(s,t,x) = m_t + \sqrt{v_t/v_s}(x - m_s)`."""
        ms, vs, _, _ = self._moments(s, x)
        mt, vt, _, _ = self._moments(t, x)
        return mt + torch.sqrt(vt / vs) * (x - ms)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` data samples :math:`x_1`."""
        z = torch.randn(n, *self.mu.shape, generator=generator, dtype=self.mu.dtype)
        return self.mu + self.c * z


class GaussianMixtureTarget:
    """Exact velocity of a diagonal Gaussian mixture (a teacher with no training error)."""

    def __init__(
        self,
        weights: Tensor,
        means: Tensor,
        stds: Tensor,
        schedule: str | Schedule = "linear",
    ) -> None:
        self.weights = torch.as_tensor(weights) / torch.as_tensor(weights).sum()
        self.means, self.stds = torch.as_tensor(means), torch.as_tensor(stds)
        self.path = AffinePath(schedule)
        self.data_shape = tuple(self.means.shape[1:])

    @classmethod
    def ring(cls, k: int = 8, radius: float = 2.0, std: float = 0.2, dtype=torch.float32):
        """``k`` equal components on a circle of ``radius`` in 2D (an 8-Gaussians toy)."""
        ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
        means = radius * torch.stack([ang.cos(), ang.sin()], dim=1)
        return cls(
            torch.ones(k, dtype=dtype), means.to(dtype), torch.full_like(means, std).to(dtype)
        )

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        r""":math:`b_t(x) = \sum_k w_k(x,t)\, b^k_t(x)`, :math:`w_k \propto \pi_k N(x; \alpha_t\mu_k, v^k_t)`."""
        k = self.path.coefficients(as_time(t, x), x)
        xx = x[:, None]  # (B, 1, d)
        mu, c2 = self.means.to(x)[None], self.stds.to(x)[None] ** 2  # (1, K, d)
        a, s, da, ds = (expand_like(getattr(k, n).flatten(), xx) for n in vars(k))
        m = a * mu
        v = a**2 * c2 + s**2
        comp_v = da * mu + (a * da * c2 + s * ds) / v * (xx - m)
        logp = -0.5 * (((xx - m) ** 2) / v + torch.log(2 * math.pi * v)).flatten(2).sum(-1)
        w = torch.softmax(logp + torch.log(self.weights.to(x))[None], dim=1)  # (B, K)
        return (w.reshape(*w.shape, *([1] * (x.ndim - 1))) * comp_v).sum(1)

    __call__ = velocity  # a Velocity: b(x, t)

    def denoise(self, x: Tensor, a: Tensor, g: Tensor) -> Tensor:
        r"""The posterior mean :math:`E[x_1 \mid a x_1 + g\varepsilon = x]` for any coefficients
        ``a``, ``g`` ``(B,)`` (any path, any time): per component
        :math:`\mu_k + a c_k^2 (x - a\mu_k)/(a^2c_k^2 + g^2)`, weighted
        :math:`\propto \pi_k N(x; a\mu_k, a^2c_k^2 + g^2)` — the exact denoiser, so an oracle
        of every prediction (:mod:`flowmap.teachers`)."""
        xx = x[:, None]
        mu, c2 = self.means.to(x)[None], self.stds.to(x)[None] ** 2
        a, g = (expand_like(torch.as_tensor(v, device=x.device).to(x.dtype), xx) for v in (a, g))
        v = a**2 * c2 + g**2
        post = mu + a * c2 / v * (xx - a * mu)
        logp = -0.5 * (((xx - a * mu) ** 2) / v + torch.log(2 * math.pi * v)).flatten(2).sum(-1)
        w = torch.softmax(logp + torch.log(self.weights.to(x))[None], dim=1)
        return (w.reshape(*w.shape, *([1] * (x.ndim - 1))) * post).sum(1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` data samples :math:`x_1`."""
        idx = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        z = torch.randn(n, *self.data_shape, generator=generator, dtype=self.means.dtype)
        return self.means[idx] + self.stds[idx] * z

    def flow_map(
        self, x: Tensor, s: float, t: float, rtol: float = 1e-9, atol: float = 1e-9
    ) -> Tensor:
        """Reference :math:`X(s,t,x)` from a tight float64 dopri5 solve (scalar ``s``, ``t``)."""
        sol = solve_adaptive(self.velocity, x.double(), rtol=rtol, atol=atol, t0=s, t1=t)
        return sol.x.to(x.dtype)


class ClassConditionalMixture:
    r"""A class-conditional teacher with no training error: class :math:`c` is the diagonal
    Gaussian mixture ``classes[c]``, drawn with prior ``priors[c]``.

    ``target(x, t, y=labels, w=scales)`` is :math:`b^w_t(x \mid y)` (``w=None``: :math:`w = 1`;
    label -1: the unconditional velocity of the whole mixture). ``label_dropout`` is 1 in spirit:
    the unconditional velocity is exact, so every scale is allowed.
    """

    def __init__(
        self,
        classes: list[GaussianMixtureTarget],
        priors: Tensor | None = None,
        schedule: str | Schedule = "linear",
    ) -> None:
        if len(classes) < 2:
            raise ValueError(
                f"A class-conditional mixture needs at least 2 classes, got {len(classes)}."
            )
        self.classes = list(classes)
        k = len(classes)
        p = torch.ones(k, dtype=torch.float64) if priors is None else torch.as_tensor(priors)
        self.priors = p.double() / p.double().sum()
        self.num_classes = k
        self.conditioning = Conditioning(k)
        self.path = AffinePath(schedule)
        self.data_shape = classes[0].data_shape
        weights = torch.cat([pc * m.weights.double() for pc, m in zip(self.priors, classes)])
        self.unconditional = GaussianMixtureTarget(
            weights,
            torch.cat([m.means for m in classes]),
            torch.cat([m.stds for m in classes]),
            schedule,
        )
        for m in (*classes, self.unconditional):
            m.path = self.path

    @classmethod
    def rings(cls, num_classes: int = 2, per_class: int = 4, radius: float = 2.0, std: float = 0.2):
        """``num_classes`` interleaved rings: class :math:`c` holds every ``num_classes``-th
        component of a ring of ``num_classes · per_class`` equal Gaussians in 2D."""
        ring = GaussianMixtureTarget.ring(num_classes * per_class, radius, std, dtype=torch.float64)
        return cls(
            [
                GaussianMixtureTarget(
                    ring.weights[c::num_classes],
                    ring.means[c::num_classes],
                    ring.stds[c::num_classes],
                )
                for c in range(num_classes)
            ]
        )

    def class_velocity(self, x: Tensor, t: Tensor | float, y: Tensor) -> Tensor:
        r""":math:`b_t(x \mid y)` row by row (label -1: :math:`b_t(x \mid \varnothing)`)."""
        t = as_time(t, x)
        out = torch.empty_like(x)
        for c in y.unique().tolist():
            rows = y == c
            model = self.unconditional if c == NULL_CLASS else self.classes[c]
            out[rows] = model.velocity(x[rows], t[rows])
        return out

    def velocity(
        self, x: Tensor, t: Tensor | float, y: Tensor | None = None, w: Tensor | None = None
    ) -> Tensor:
        r""":math:`b^w_t(x \mid y)`; with no labels, the unconditional velocity."""
        if y is None:
            return self.unconditional.velocity(x, t)
        y, w = self.conditioning.check(y, w, x.shape[0], x.device, "oracle")

        def branch(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            return self.class_velocity(x, t, y)

        return guided_velocity(branch, x, as_time(t, x), y, w)

    __call__ = velocity  # a Velocity: b(x, t, y=..., w=...)

    def log_class_posterior(self, x: Tensor) -> Tensor:
        r"""The exact class posterior of data points, :math:`\log p(c \mid x_1)` ``(B, K)``:
        :math:`\log \pi_c + \log p_c(x_1)`, normalised over the classes."""
        xx = x[:, None]
        logp = []
        for m in self.classes:
            mu, c2 = m.means.to(x)[None], m.stds.to(x)[None] ** 2
            comp = -0.5 * (((xx - mu) ** 2) / c2 + torch.log(2 * math.pi * c2)).flatten(2).sum(-1)
            logp.append(torch.logsumexp(comp + torch.log(m.weights.to(x))[None], dim=1))
        joint = torch.stack(logp, dim=1) + torch.log(self.priors.to(x))[None]
        return torch.log_softmax(joint, dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` labelled data samples ``(x1, y)``."""
        y = torch.multinomial(self.priors, n, replacement=True, generator=generator)
        x = torch.empty(n, *self.data_shape, dtype=self.unconditional.means.dtype)
        for c in range(self.num_classes):
            rows = y == c
            if rows.any():
                x[rows] = self.classes[c].sample(int(rows.sum()), generator)
        return x, y

    def flow_map(
        self,
        x: Tensor,
        s: float,
        t: float,
        y: Tensor,
        w: Tensor | float | None = None,
        rtol: float = 1e-9,
        atol: float = 1e-9,
    ) -> Tensor:
        r"""Reference :math:`X(s,t,x \mid y, w)` of the guided ODE from a tight float64 dopri5 solve."""
        cond = {"y": y, "w": as_scales(w, x.shape[0], x.device)}
        sol = solve_adaptive(self.velocity, x.double(), rtol=rtol, atol=atol, t0=s, t1=t, cond=cond)
        return sol.x.to(x.dtype)
