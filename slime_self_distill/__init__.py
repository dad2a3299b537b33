"""Self-distillation for THUDM's slime: SDFT, OPSD, SDPO and offline top-K distillation as a plugin.

The math (``divergences``, ``token_filters``) is pure torch; the slime glue (``data_source``,
``custom_convert``, ``custom_loss``, ``megatron_hooks``, ``train``) imports slime lazily.
"""

from slime_self_distill.config import ConfigError, SelfDistillConfig, add_self_distill_arguments

__all__ = ["ConfigError", "SelfDistillConfig", "add_self_distill_arguments"]
__version__ = "0.1.0"
