"""Device meshes and multi-host setup."""

from .mesh import MESH_AXES, make_mesh, maybe_initialize_distributed

__all__ = ["MESH_AXES", "make_mesh", "maybe_initialize_distributed"]
