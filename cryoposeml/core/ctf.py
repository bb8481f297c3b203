"""The one owner of the contrast transfer function: Relion 3.1's model and columns.

``CTF(k) = -sin(pi*lambda*dz(k)*|k|^2 + pi/2*Cs*lambda^3*|k|^4 - phase_shift - atan(Q0/sqrt(1-Q0^2)))
* exp(-B/4*|k|^2)`` with ``dz(k) = -(dU+dV)/2 - (dU-dV)/2*cos(2*(atan2(ky,kx) - angle))``
(Relion's src/ctf.h), times ``rlnCtfScalefactor``. Frequencies ``k`` are in 1/Angstrom; images
use the centred Fourier layout of :mod:`cryoposeml.core.fourier`. Checked against
``relion_project --ctf`` in the tests.

:func:`ctf_2d` gives the modulation the images *carry*: for particles already phase-flipped
(``rlnCtfDataArePhaseFlipped 1``) that is ``|CTF|``, as Relion's ``ctf_phase_flipped``. So every
user of it (reconstruction, matching, the networks' phase flip, ab initio's decoder) handles both
states without knowing about them: flipping phase-flipped images again is a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ._lazy import LazyModule

torch = LazyModule("torch", __name__)

__all__ = ["CtfParams", "ctf_2d", "electron_wavelength_angstrom"]


@dataclass
class CtfParams:
    """Per-particle CTF parameters (arrays of shape ``(B,)``), named as Relion's columns."""

    defocus_u_angstrom: np.ndarray      # rlnDefocusU
    defocus_v_angstrom: np.ndarray      # rlnDefocusV
    defocus_angle_deg: np.ndarray       # rlnDefocusAngle
    voltage_kv: np.ndarray              # rlnVoltage (optics)
    cs_mm: np.ndarray                   # rlnSphericalAberration (optics)
    amplitude_contrast: np.ndarray      # rlnAmplitudeContrast (optics)
    phase_shift_deg: np.ndarray | float = 0.0   # rlnPhaseShift
    bfactor: np.ndarray | float = 0.0           # rlnCtfBfactor
    scale: np.ndarray | float = 1.0             # rlnCtfScalefactor
    phase_flipped: np.ndarray | bool = False    # rlnCtfDataArePhaseFlipped (optics): the images carry |CTF|

    def __len__(self) -> int:
        return len(np.atleast_1d(self.defocus_u_angstrom))

    def subset(self, index) -> "CtfParams":
        """The parameters of the particles ``index`` (an index array or slice)."""
        def take(v):
            a = np.asarray(v)
            return a[index] if a.ndim else a
        return CtfParams(**{f.name: take(getattr(self, f.name)) for f in fields(self)})


def electron_wavelength_angstrom(voltage_kv):
    """Relativistic electron wavelength (Angstrom) at an acceleration voltage in kV (Relion's)."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


def ctf_2d(params: CtfParams, box: int, pixel_size_angstrom: float, dtype=None,
           device=None) -> torch.Tensor:
    """The CTF the images carry ``(B, box, box)``, centred Fourier layout (DC at ``box // 2``):
    ``|CTF|`` for phase-flipped particles."""
    from .fourier import frequency_grid_2d

    dtype = torch.float32 if dtype is None else dtype

    def col(v):
        return torch.as_tensor(np.broadcast_to(np.asarray(v, dtype=np.float64), (len(params),)).copy(),
                               device=device)[:, None, None]

    kx, ky = frequency_grid_2d(box, pixel_size_angstrom, dtype=torch.float64, device=device)
    u2 = kx**2 + ky**2
    lam = torch.as_tensor(electron_wavelength_angstrom(np.broadcast_to(params.voltage_kv, (len(params),))),
                          device=device)[:, None, None]
    cs = col(params.cs_mm) * 1e7
    q0 = col(params.amplitude_contrast)
    k1 = torch.pi * lam
    k2 = torch.pi / 2 * cs * lam**3
    k3 = torch.atan(q0 / torch.sqrt(1 - q0**2))
    k4 = -col(params.bfactor) / 4
    k5 = torch.deg2rad(col(params.phase_shift_deg))
    du, dv = col(params.defocus_u_angstrom), col(params.defocus_v_angstrom)
    azimuth = torch.deg2rad(col(params.defocus_angle_deg))
    deltaf = -(du + dv) / 2 - (du - dv) / 2 * torch.cos(2 * (torch.atan2(ky, kx) - azimuth))
    ctf = -torch.sin(k1 * deltaf * u2 + k2 * u2**2 - k5 - k3) * torch.exp(k4 * u2) * col(params.scale)
    flipped = np.broadcast_to(np.asarray(params.phase_flipped, dtype=bool), (len(params),))
    if flipped.any():
        ctf = torch.where(torch.as_tensor(flipped.copy(), device=device)[:, None, None], ctf.abs(), ctf)
    return ctf.to(dtype)
