"""Heterogeneity (HetACUMN): the conformation-conditioned decoder."""
import numpy as np
import torch

from cryoposeml.core.fourier import ifft2_centered
from cryoposeml.core.projection import Projector
from cryoposeml.core.rotations import random_rotations
from cryoposeml.data.bundled import resolve_map
from cryoposeml.data.mrc import read_map
from cryoposeml.models.decoders import ConditionalVoxelDecoder


def test_conditional_decoder_mixes_exact_slices_of_its_maps():
    """Mean map (open + closed) / 2 and one basis map (open - closed) / 2, with a(z) = z: at z = +1
    the slices are the open map's projections, at z = -1 the closed map's, the same through
    :meth:`render_basis` mixed per particle, and :meth:`volume` gives the maps back."""
    open_, _ = read_map(resolve_map("adk_open"))
    closed, _ = read_map(resolve_map("adk_closed"))
    dec = ConditionalVoxelDecoder(64, zdim=1, n_basis=2, hidden=2)
    dec.maps[0].load_map((open_ + closed) / 2)
    dec.maps[1].load_map((open_ - closed) / 2)             # the second basis map stays 0
    with torch.no_grad():                                   # a_1(z) = relu(z) - relu(-z) = z, a_2 = 0
        dec.mix[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        dec.mix[0].bias.zero_()
        dec.mix[2].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        dec.mix[2].bias.zero_()
    A = torch.as_tensor(random_rotations(4, 1), dtype=torch.float32)
    for z, vol in ((1.0, open_), (-1.0, closed)):
        zz = torch.full((4, 1), z)
        got = ifft2_centered(dec(A, zz)).real
        expected = Projector(vol).project(A)
        assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()))
        basis = dec.render_basis(A)                                         # (3, 4, N, N)
        mixed = (dec.weights(zz).T[:, :, None, None] * basis).sum(0)
        assert torch.allclose(ifft2_centered(mixed).real, expected, atol=1e-4 * float(expected.abs().max()))
        np.testing.assert_allclose(dec.volume(torch.tensor([z])).numpy(), vol, atol=1e-5 * np.abs(vol).max())
    # a fresh decoder is one map: a(z) = 0 whatever z
    fresh = ConditionalVoxelDecoder(16, zdim=3)
    assert torch.equal(fresh.weights(torch.randn(5, 3))[:, 1:], torch.zeros(5, 4))
