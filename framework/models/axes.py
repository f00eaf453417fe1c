"""The logical axis names the models give their arrays: the only names `mesh.axis_rules` may map.

A rule for a name no model uses would silently shard nothing (a typo such as 'head' for 'heads' leaves the
heads replicated), so the mesh section refuses it. A model that introduces a new name adds it here, with its
default rule in framework.mesh.DEFAULT_AXIS_RULES.
"""

LOGICAL_AXES = {
    'batch': 'examples of a batch (activations, inputs)',
    'seq': 'positions in a sequence (activations)',
    'act_embed': 'model width of activations (kept apart from embed so the batch may take the fsdp axis)',
    'embed': 'model width of parameters (FSDP-sharded by default)',
    'heads': 'query heads',
    'kv_heads': 'key/value heads',
    'head_dim': 'width of one head',
    'mlp': 'hidden width of the feed-forward block',
    'vocab': 'vocabulary entries (embedding table rows, logits)',
    'layers': 'the stacked-layer axis of scanned parameters',
    'expert': 'the experts of an MoE layer (expert parallelism)',
}
