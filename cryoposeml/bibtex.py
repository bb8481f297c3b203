# -*- coding: utf-8 -*-
"""The five papers cryoposeml's methods come from (Scipion reads this docstring as BibTeX).

@article{Cesped2024,
title = {CESPED: a new benchmark for supervised particle pose estimation in Cryo-EM},
author = {Sanchez-Garcia, Ruben and Saur, Michael and Vargas, Javier and Poelking, Carl and Deane, Charlotte M.},
journal = {arXiv},
eprint = {2311.06194},
year = {2023},
url = {https://arxiv.org/abs/2311.06194}
}

@inproceedings{Nashed2021,
title = {CryoPoseNet: End-to-End Simultaneous Learning of Single-particle Orientation and 3D Map Reconstruction from Cryo-electron Microscopy Data},
author = {Nashed, Youssef S. G. and others},
booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision Workshops (ICCVW)},
year = {2021}
}

@article{Fang2025,
title = {Cryo-forum: A framework for orientation recovery with uncertainty measure with the application in cryo-EM image analysis},
journal = {arXiv},
eprint = {2307.09847},
year = {2023},
url = {https://arxiv.org/abs/2307.09847}
}

@article{Hetacumn2023,
title = {Improved Cryo-EM Pose Estimation and 3D Classification through Latent-Space Disentanglement (HetACUMN)},
journal = {arXiv},
eprint = {2308.04956},
year = {2023},
url = {https://arxiv.org/abs/2308.04956}
}

@article{Equivariant2025,
title = {Equivariant Amortized Inference of Poses for Cryo-EM},
author = {de Ruijter, Larissa and Cesa, Gabriele},
journal = {arXiv},
eprint = {2406.01630},
year = {2024},
url = {https://arxiv.org/abs/2406.01630}
}
"""
