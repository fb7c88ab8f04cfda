"""Tensor (feature-sharded) and data parallelism over torch.distributed, applied from outside the
single-device model: the mesh (``mesh``), feature sharding (``tensor``: ``parallelize``, state
sharding, the global gradient norm) and data parallelism (``data``: gradient averaging, the
tensor-parallel group's shared batch). See DESIGN.md, "Distributed"."""

from .data import GradSync, ShardedSource
from .mesh import Mesh, init_mesh, mesh_from_group, shutdown
from .tensor import (
    DECODER,
    SHARDED,
    MeshShard,
    clip_grad_norm,
    local_states,
    merge_model_states,
    merge_optimizer_states,
    merge_tensors,
    parallelize,
    select_top,
    shard_model_state,
    shard_optimizer_state,
    shard_parameters,
    shard_tensor,
)

__all__ = [
    "DECODER", "SHARDED", "GradSync", "Mesh", "MeshShard", "ShardedSource", "clip_grad_norm",
    "init_mesh", "local_states", "merge_model_states", "merge_optimizer_states", "merge_tensors",
    "mesh_from_group", "parallelize", "select_top", "shard_model_state", "shard_optimizer_state",
    "shard_parameters", "shard_tensor", "shutdown",
]
