"""Lazy particle datasets over many .mrcs stacks: images are read on demand through
:class:`~cryoposeml.data.mrc.StackReader`, so memory does not grow with the number of particles."""
from __future__ import annotations

import numpy as np
import torch

from ..core.errors import InputError
from .mrc import StackReader
from .star import ParticleStar

__all__ = ["ParticleDataset"]


class ParticleDataset(torch.utils.data.Dataset):
    """Images of a :class:`ParticleStar`, checked up front against their stacks' headers.

    ``dataset[i]`` is a float32 ``(box, box)`` tensor; :meth:`read_batch` reads many at once,
    grouped by stack. ``transform`` (e.g. a :class:`~cryoposeml.data.preprocess.Preprocessor`
    bound to the STAR's CTFs) is applied to each batch with the particles' indices.
    """

    def __init__(self, star: ParticleStar, max_open_stacks: int = 32, transform=None):
        self.star = star
        self.transform = transform
        self.stacks, self.stack_of, self.slices = star.image_locations()
        self.reader = StackReader(max_open_stacks)
        box = star.box
        for k, path in enumerate(self.stacks):
            info = self.reader.info(path)
            if (info.ny, info.nx) != (box, box):
                raise InputError(f"images are {info.nx} x {info.ny} px but data_optics says rlnImageSize {box}",
                                 path)
            used = self.slices[self.stack_of == k]
            if used.max() >= info.n:
                raise InputError(f"the STAR file {star.path} asks for image {int(used.max()) + 1} but the stack "
                                 f"holds {info.n}", path)

    def __len__(self) -> int:
        return len(self.slices)

    def read_batch(self, indices) -> np.ndarray:
        """Raw images ``(B, box, box)`` float32 of particles ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        box = self.star.box
        out = np.empty((len(indices), box, box), np.float32)
        stack_of = self.stack_of[indices]
        for k in np.unique(stack_of):
            sel = np.nonzero(stack_of == k)[0]
            out[sel] = self.reader.read(self.stacks[k], self.slices[indices[sel]])
        if self.transform is not None:
            out = self.transform(out, indices)
        return out

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.read_batch([i])[0])

    def batches(self, batch_size: int = 256, indices=None):
        """Yield ``(indices, images)`` in order, ``batch_size`` particles at a time."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices)
        for s in range(0, len(indices), batch_size):
            idx = indices[s:s + batch_size]
            yield idx, self.read_batch(idx)

    def read_all(self, desc: str = "reading", progress: bool = False, batch_size: int = 512) -> torch.Tensor:
        """Every (transformed) image in one float32 tensor ``(N, n, n)``, with a progress bar."""
        from tqdm import tqdm

        out = None
        bar = tqdm(total=len(self), desc=desc, unit="img", disable=not progress)
        for idx, imgs in self.batches(batch_size):
            if out is None:
                out = torch.empty(len(self), *imgs.shape[1:])
            out[idx] = torch.from_numpy(imgs)
            bar.update(len(idx))
        bar.close()
        return out
