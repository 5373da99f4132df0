"""The methods by name. A method module registers its class with `@register`; `merge/__init__.py`
imports the method modules so that every method is known once `mambamerge.merge` is imported."""
from typing import Dict, Type

METHODS: Dict[str, Type] = {}


def register(cls: Type) -> Type:
    """Class decorator: make a ReductionMethod subclass available by its `name` (patch, CLI, sweeps)."""
    name = cls.name
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"two token-reduction methods are named {name!r}: {METHODS[name].__name__} and "
                         f"{cls.__name__}")
    METHODS[name] = cls
    return cls
