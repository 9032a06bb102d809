"""Framework integrations.  Nothing here is imported by ``import fastsam``; each submodule
imports its framework when it is imported itself:

- ``fastsam.integrations.transformers``: ``SAMTrainer``, a Hugging Face ``Trainer``
  whose ``training_step`` runs SAM's two passes (extra ``fastsam[transformers]``).

- ``fastsam.integrations.lightning``: how FusedSAM recognises Lightning's automatic-optimization
  closure (no Lightning import; ``FusedSAM`` works under automatic optimization (32-bit,
  bf16) and manual optimization as it is: see ``examples/``).
- ``fastsam.integrations.checkpoints``: the state-dict layouts of earlier fastsam versions and
  of other SAM classes, converted to the current one.
"""
