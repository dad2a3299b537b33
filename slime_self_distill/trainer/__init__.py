"""Trainer-side pieces the Megatron hooks (``slime_self_distill.megatron_hooks``) use: the teacher's outputs per
response row, the teacher's weights (EMA, teacher-aware backuper), and the start-up check of slime's interfaces."""
