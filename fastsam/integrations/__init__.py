"""Framework integrations.  Nothing here is imported by ``import fastsam``; each submodule
imports its framework when it is imported itself:

- ``fastsam.integrations.transformers``: ``SAMTrainer``, a Hugging Face ``Trainer``
  whose ``training_step`` runs SAM's two passes (extra ``fastsam[transformers]``).

Lightning needs no helper: ``FusedSAM`` works under automatic optimization (32-bit,
bf16) and manual optimization as it is; see the README section "Frameworks and AMP"
and ``examples/``.
"""
