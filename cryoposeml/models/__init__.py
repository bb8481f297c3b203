"""Torch modules: encoders, rotation and shift heads, pose networks and their losses."""
from .pose_net import PoseNet, PoseNetConfig, build_model

__all__ = ["PoseNet", "PoseNetConfig", "build_model"]
