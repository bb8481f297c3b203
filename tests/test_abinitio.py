"""Ab initio building blocks: decoders render what the projector renders, global pose alignment
finds the frame and the hand."""
import numpy as np
import torch

from cryoposeml.core.fourier import ifft2_centered, trilinear_apodization
from cryoposeml.core.metrics import align_poses_globally
from cryoposeml.core.projection import Projector
from cryoposeml.core.rotations import random_rotations
from cryoposeml.models.decoders import FourierNetDecoder, VoxelDecoder


def test_voxel_decoder_slices_equal_the_projector(adk_map):
    vol, _ = adk_map
    n = vol.shape[0]
    dec = VoxelDecoder(n)
    with torch.no_grad():
        corrected = torch.as_tensor(vol, dtype=torch.float64) / trilinear_apodization(n, 2 * n)
        dec.voxels.copy_((corrected / dec.scale).float())
    A = torch.as_tensor(random_rotations(5, 0), dtype=torch.float32)
    got = ifft2_centered(dec(A)).real
    expected = Projector(vol).project(A)
    assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()))
    # the map it reports is the map it was given
    np.testing.assert_allclose(dec.volume().numpy(), vol, atol=1e-5 * np.abs(vol).max())


def test_fouriernet_is_hermitian_so_its_images_are_real():
    torch.manual_seed(0)
    dec = FourierNetDecoder(16, hidden=32, layers=2)
    torch.nn.init.normal_(dec.out.weight, std=0.5)
    A = torch.as_tensor(random_rotations(3, 1), dtype=torch.float32)
    spec = dec(A).detach()
    img = ifft2_centered(spec)
    assert img.real.abs().max() > 1e-3
    assert img.imag.abs().max() < 1e-5 * img.real.abs().max()
    vol = dec.volume()
    assert vol.shape == (16, 16, 16) and torch.isfinite(vol).all()


def test_global_alignment_finds_the_frame_and_the_hand():
    true = random_rotations(300, 2)
    Q = random_rotations(1, 3)[0]
    M = np.diag([1.0, 1.0, -1.0])
    noise = random_rotations(300, 4)
    for mirrored in (False, True):
        pred = true @ Q.T
        if mirrored:
            pred = M @ pred @ M
        r = align_poses_globally(pred, true)
        assert r["mirrored"] == mirrored and r["mse"] < 1e-20
        np.testing.assert_allclose(r["aligned"], true, atol=1e-10)
    # unrelated poses: far from converged (random rotations give ||R - R'||^2 of about 6 on average)
    r = align_poses_globally(noise, true)
    assert r["medse"] > 4 and r["median_deg"] > 90
