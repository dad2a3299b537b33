"""Stand-ins for the only two modules slime's Megatron backend imports that are not on PyPI.

``megatron.training`` (Megatron-LM's training package; ``megatron-core`` ships ``megatron.core`` only) and
``torch_memory_saver``. They provide the names slime imports at module level and nothing else: any use raises,
naming the stand-in. Installed only when the real module cannot be found.
"""

import importlib.util
import sys
import types

MEGATRON_TRAINING_NAMES = {
    "megatron.training.global_vars": ("get_args", "set_args", "_build_tokenizer"),
    "megatron.training.training": ("get_model",),
    "megatron.training.checkpointing": ("load_checkpoint", "save_checkpoint"),
    "megatron.training.arguments": ("parse_args", "validate_args", "core_transformer_config_from_args"),
}


def _unavailable(qualified_name):
    def unavailable(*args, **kwargs):
        raise RuntimeError(f"{qualified_name} is a test stand-in (megatron.training is not installed)")

    unavailable.__name__ = qualified_name.rpartition(".")[2]
    return unavailable


class _UnavailableMemorySaver:
    def __getattr__(self, name):
        raise RuntimeError(f"torch_memory_saver.{name} is a test stand-in (torch_memory_saver is not installed)")


def _module_missing(name: str) -> bool:
    if name in sys.modules:  # real, or a stand-in installed earlier
        return False
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:
        return True


def install_standins() -> None:
    if _module_missing("megatron.training"):
        package = types.ModuleType("megatron.training")
        package.__path__ = []
        sys.modules["megatron.training"] = package
        for module_name, names in MEGATRON_TRAINING_NAMES.items():
            module = types.ModuleType(module_name)
            for name in names:
                setattr(module, name, _unavailable(f"{module_name}.{name}"))
            sys.modules[module_name] = module
            setattr(package, module_name.rpartition(".")[2], module)
    if _module_missing("torch_memory_saver"):
        module = types.ModuleType("torch_memory_saver")
        module.torch_memory_saver = _UnavailableMemorySaver()
        sys.modules["torch_memory_saver"] = module
