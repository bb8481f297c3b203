"""Pose search: the one owner of how poses are searched against projections, whatever renders them.

Three searches use it: the reference matching of verified prediction (:mod:`.matching`, slices of
a fixed map, a normalised match score), and the searches of ab initio and heterogeneity
(:mod:`cryoposeml.engine.abinitio`, :mod:`cryoposeml.engine.hetero`: slices of a decoder that is
being learned, a squared spectral distance). What they share lives here:

- the grids: a HEALPix SO(3) grid of one asymmetric unit (:func:`so3_grid`), whole-pixel origins
  (:func:`origin_grid`), the small turns and origin steps of a local search (:func:`axis_moves`,
  :func:`cube_moves`, :func:`shift_moves`);
- the distance of a particle's spectrum to a CTF-weighted, shifted slice in a band
  (:func:`image_loss` for given poses, :func:`distance_table` for every origin x grid pose at once
  as matrix products);
- drawing a pose from the posterior a distance table defines (:func:`draw_from_posterior`);
- local refinement by a pattern search around each particle's pose (:func:`pattern_search`);
- the global search against a decoder's slices (:class:`GridSearch`), refreshed on a schedule
  that restarts every epoch, so that a run resumed at an epoch boundary searches as an
  uninterrupted one does.

Conventions: poses are Relion's ``A`` (``(..., 3, 3)``, the image frame's axes in map
coordinates); a turn ``T`` of a local search acts in the image frame, ``T @ A``; origins are
Relion's, in pixels of the working box (the data are re-centred by ``ph(o)``, the slice shifted by
``ph(-o)``). Tensors only: no files.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .fourier import shift_phase_2d
from .grids import grid_spacing_deg, healpix_so3_grid
from .symmetry import to_asymmetric_unit

__all__ = ["so3_grid", "origin_grid", "axis_moves", "cube_moves", "shift_moves", "image_loss", "recentred", "distance_table",
           "draw_from_posterior", "pattern_search", "GridSearch"]


# -- grids and moves -------------------------------------------------------------------------------

def so3_grid(order: int, sym: str = "C1", device=None, dtype=torch.float32) -> torch.Tensor:
    """The HEALPix SO(3) grid of ``order`` (Relion's: 60 / 2**order degrees) restricted to one
    asymmetric unit of ``sym`` (the grid points that are their own canonical mate) ``(P, 3, 3)``."""
    grid = torch.as_tensor(healpix_so3_grid(order), dtype=dtype)
    if sym.upper() != "C1":
        # decided at the precision the poses are kept in: points on the unit's border stay in it
        canon = to_asymmetric_unit(grid.double(), sym).to(dtype)
        grid = grid[(canon - grid).abs().amax((-2, -1)) < 1e-4]
    return grid.to(device)


def origin_grid(max_px: int, device=None) -> torch.Tensor:
    """Whole-pixel origins ``(x, y)`` in ``[-max_px, max_px]^2`` ``((2 max_px + 1)^2, 2)``, x fastest."""
    k = torch.arange(-max_px, max_px + 1, dtype=torch.float32, device=device)
    return torch.stack(torch.meshgrid(k, k, indexing="xy"), -1).reshape(-1, 2)


def _rotvecs(vecs: np.ndarray, step_deg: float, device, dtype) -> torch.Tensor:
    from scipy.spatial.transform import Rotation

    return torch.as_tensor(Rotation.from_rotvec(vecs * np.radians(step_deg)).as_matrix(), dtype=dtype, device=device)


def axis_moves(step_deg: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(7, 3, 3)``: the identity (index 0), then turns by ``+-step`` about x, y and z."""
    return _rotvecs(np.vstack([np.zeros(3), np.eye(3), -np.eye(3)]), step_deg, device, dtype)


def cube_moves(step_deg: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(27, 3, 3)`` small rotations: rotation vectors ``step * {-1, 0, 1}^3``; index 13 is the
    identity."""
    g = np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij")).reshape(3, -1).T
    return _rotvecs(g.astype(float), step_deg, device, dtype)


def shift_moves(step_px: float, diagonals: bool = True, device=None) -> torch.Tensor:
    """Origin steps ``(9, 2)`` (with ``diagonals``) or ``(5, 2)``: 0 (index 0), then ``+-step`` along x
    and y (and the four diagonals)."""
    m = [[0.0, 0.0], [1, 0], [-1, 0], [0, 1], [0, -1]]
    if diagonals:
        m += [[1, 1], [1, -1], [-1, 1], [-1, -1]]
    return torch.tensor(m, dtype=torch.float32, device=device) * step_px


# -- distances -------------------------------------------------------------------------------------

def image_loss(spec: torch.Tensor, Y: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """Per-particle mean squared spectral difference of rendered spectra ``spec`` (already times CTF
    and shift phase) and data ``Y`` inside ``band`` (``(N, N)`` mask), divided by ``N^2`` (Parseval:
    a per-pixel mean squared error of the band-passed images). Broadcasts over leading dims."""
    return ((spec - Y).abs() ** 2 * band).sum((-2, -1)) / (band.sum() * Y.shape[-1] ** 2)


def recentred(Y: torch.Tensor, origins: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """The data ``Y`` ``(B, N, N)`` re-centred at every origin ``(O, 2)``, at the band's points
    ``(B, O, M)``: ``|Y - c S ph(-o)| = |Y ph(o) - c S|``."""
    return (Y[:, None] * shift_phase_2d(origins, Y.shape[-1])[None])[..., band]


def distance_table(Yo: torch.Tensor, c: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Squared distances ``(B, O, P)`` of re-centred data ``Yo`` ``(B, O, M)`` (:func:`recentred`) to
    the CTF-weighted slices ``c S`` (``c`` ``(B, M)``, ``S`` ``(P, M)``), as two matrix products:
    ``|Yo|^2 + c^2 |S|^2 - 2 Re conj(Yo) c S``."""
    power = (c**2) @ (S.abs() ** 2).T                                                  # (B, P)
    cross = ((Yo.conj() * c[:, None]) @ S.T).real                                      # (B, O, P)
    return (Yo.abs() ** 2).sum(-1, keepdim=True) + power[:, None] - 2 * cross


def draw_from_posterior(loss: torch.Tensor, n_points: int, temperature: float, generator) -> tuple:
    """``loss`` ``(B, K)``, squared distances over ``n_points`` band points -> indices ``(pick, best)``
    ``(B,)``: a draw from each particle's posterior and its mode. The noise level is taken from the
    best match (``2 sigma^2 = 2 min loss / n_points`` per point) times ``temperature``."""
    lmin = loss.min(1, keepdim=True).values
    tau = temperature * 2 * lmin.clamp(min=1e-12) / n_points
    pick = torch.multinomial(torch.softmax(-(loss - lmin) / tau, 1), 1, generator=generator)[:, 0]
    return pick, loss.argmin(1)


# -- local refinement ------------------------------------------------------------------------------

def pattern_search(score: Callable, A: torch.Tensor, origins: torch.Tensor, turns: torch.Tensor,
                   moves: torch.Tensor, repeats: int = 1) -> dict:
    """Local refinement of each particle's pose ``A`` ``(B, 3, 3)`` and origin ``(B, 2)``: the
    candidates are the pose turned by each of ``turns`` ``(T, 3, 3)`` (index 0 the identity; image
    frame, ``T @ A``) times the origin plus each of ``moves`` ``(O, 2)`` (index 0 zero); the best
    becomes the centre, again (up to ``repeats`` times) for the particles that moved.

    ``score(active, C, o)`` gives the scores ``(b, O, T)`` (higher is better) of particles
    ``active`` ``(b,)`` at candidate poses ``C`` ``(b, T, 3, 3)`` and origins ``o[:, None] + moves``,
    optionally with a per-pose extra ``(b, T)`` (returned at the winners as ``extra``).

    Returns ``matrix``, ``origin``, ``score`` ``(B,)``, ``extra`` (or None) and ``n_scored`` (the
    candidates each particle scored)."""
    A, o = A.clone(), origins.clone()
    B, dev = len(A), A.device
    best_score = torch.full((B,), -float("inf"), device=dev)
    extra_out = None
    n_scored = torch.zeros(B, device=dev)
    active = torch.arange(B, device=dev)
    for _ in range(repeats):
        C = turns[None] @ A[active, None]                                                 # (b, T, 3, 3)
        got = score(active, C, o[active])
        s, extra = got if isinstance(got, tuple) else (got, None)
        n_scored[active] += s.shape[1] * s.shape[2]
        flat = s.reshape(len(active), -1)
        best = flat.argmax(1)
        bo, bc = best // len(turns), best % len(turns)
        ar = torch.arange(len(active), device=dev)
        A[active], o[active] = C[ar, bc], o[active] + moves[bo]
        best_score[active] = flat[ar, best]
        if extra is not None:
            if extra_out is None:
                extra_out = torch.zeros(B, dtype=extra.dtype, device=dev)
            extra_out[active] = extra[ar, bc]
        active = active[(bo != 0) | (bc != 0)]
        if len(active) == 0:
            break
    return {"matrix": A, "origin": o, "score": best_score, "extra": extra_out, "n_scored": n_scored}


# -- the global search against a decoder -----------------------------------------------------------

class GridSearch:
    """Global search over a HEALPix SO(3) grid x whole-pixel origins against slices that a
    ``render(grid)`` call gives (a decoder's current map): each particle's posterior over the
    grid (:func:`draw_from_posterior`).

    Rendering the grid is most of the cost and the map moves little in a few steps (an EM
    iteration keeps it a whole pass), so the slices are rendered again every ``refresh_steps``
    calls, counted from :meth:`new_epoch` (checkpoints fall on epoch boundaries: a resumed run
    renders where an uninterrupted one does)."""

    def __init__(self, order: int, shift_px: int, box: int, refresh_steps: int = 1, device=None):
        self.grid = so3_grid(order, device=device)
        self.origins = origin_grid(shift_px, device)
        self.box = box
        self.spacing_deg = grid_spacing_deg(order)
        self.refresh_steps = max(1, refresh_steps)
        self._cache, self._key, self._calls = None, None, 0

    def new_epoch(self) -> None:
        """Forget the rendered slices: the next call renders."""
        self._cache, self._key, self._calls = None, None, 0

    def cached(self, key, render: Callable):
        """``render()`` on the schedule (or when ``key``, e.g. the band, changed), else the last result."""
        if self._cache is None or self._calls % self.refresh_steps == 0 or key != self._key:
            self._cache, self._key = render(), key
        self._calls += 1
        return self._cache

    def poses(self, pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices into ``(origins, grid)`` -> poses ``(B, 3, 3)`` and origins ``(B, 2)``."""
        n_pose = len(self.grid)
        return self.grid[pick % n_pose], self.origins[pick // n_pose]

    def draw(self, loss: torch.Tensor, band: torch.Tensor, temperature: float, generator) -> tuple:
        """``loss`` ``(B, O, P)`` over origins x grid poses -> drawn pose and origin, best pose and origin."""
        pick, best = draw_from_posterior(loss.reshape(len(loss), -1), int(band.sum()), temperature, generator)
        return (*self.poses(pick), *self.poses(best))

    @torch.no_grad()
    def sample(self, render: Callable, Y, ctf, band, temperature: float, generator) -> tuple:
        """``render(grid)`` -> slices ``(P, N, N)``; ``Y`` ``(B, N, N)`` spectra, ``ctf`` ``(B, N, N)``,
        ``band`` ``(N, N)`` bool -> a pose ``(B, 3, 3)`` and origin ``(B, 2)`` drawn from each
        posterior, and the best ones."""
        S = self.cached(None, lambda: render(self.grid))[:, band]                              # (P, M)
        loss = distance_table(recentred(Y, self.origins, band), ctf[:, band], S)
        return self.draw(loss, band, temperature, generator)
