"""Offline top-K distillation: a teacher's top-K log-probabilities, extracted once (``extraction``) into a Parquet
file (``topk_file``), attached to slime's SFT samples (``rollout``) for the SFT + KD loss (``custom_loss``)."""
