"""Torch modules: encoders, rotation and shift heads, pose networks and their losses."""
from .pose_net import MODEL_FAMILIES, PoseNet, PoseNetConfig, build_model

__all__ = ["MODEL_FAMILIES", "PoseNet", "PoseNetConfig", "build_model"]
