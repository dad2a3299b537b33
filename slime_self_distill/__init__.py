"""Self-distillation for THUDM's slime: SDFT, OPSD, SDPO and offline top-K distillation as a plugin.

Subpackages by role: ``core`` (pure math), ``data`` (data tools), ``contexts`` (teacher contexts), ``trainer`` (what
the Megatron hooks use). The modules slime's command line names (``data_source``, ``custom_convert``,
``custom_loss``, ``megatron_hooks``, ``sd_zero_collect``) are the slime glue and import slime lazily; ``prepare_dataset``, ``train`` and
``sd_zero_data`` are the command-line tools.
"""

from slime_self_distill.config import ConfigError, SelfDistillConfig, add_self_distill_arguments

__all__ = ["ConfigError", "SelfDistillConfig", "add_self_distill_arguments"]
__version__ = "0.1.0"
