"""The one table from logical axis names to mesh axes ('data', 'fsdp', 'tensor').

Parameters: `embed` is sharded over fsdp (ZeRO-3 style), heads / mlp / vocab over tensor.
Activations use their own `activation_*` names so the batch can take the data and fsdp
axes while the weights' embed dimension takes fsdp.
"""

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
)
