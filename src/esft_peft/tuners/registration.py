"""Registers esft-peft's methods as real peft methods.

peft's ``PeftType`` is a closed ``str`` enum and ``register_peft_method`` only accepts names that are already
members of it. We therefore add a member to the enum (the only touch of enum internals, isolated here), then call
peft's official registration. Both steps are idempotent and verified; if peft changes the enum or the registry in
a way this code does not understand, import fails loudly instead of half-working.
"""

from __future__ import annotations

import enum

import peft
from peft.utils import PeftType, register_peft_method


class RegistrationError(RuntimeError):
    """Raised when peft's internals no longer allow registering a method."""


def _extend_peft_type(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    required = ("_member_map_", "_member_names_", "_value2member_map_")
    if not issubclass(PeftType, str) or not all(hasattr(PeftType, attr) for attr in required):
        raise RegistrationError(
            f"peft {peft.__version__}: PeftType is no longer a str Enum with the expected internals; "
            f"esft-peft cannot register the {name!r} method. Please report this with your peft version."
        )
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    return member


def _verify_peft_type(name: str) -> PeftType:
    member = PeftType(name)
    ok = (
        isinstance(member, enum.Enum)
        and member is PeftType[name]
        and member is getattr(PeftType, name)
        and member.value == name
        and member == name
        and member in list(PeftType)
    )
    if not ok:
        raise RegistrationError(f"peft {peft.__version__}: adding '{name}' to PeftType did not produce a working member.")
    return member


def register_method(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Make ``name`` (upper case, e.g. ``"ESFT"``) a peft method served by ``config_cls``/``model_cls``
    (idempotent). Returns its ``PeftType`` member."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    _extend_peft_type(name)
    peft_type = _verify_peft_type(name)
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    elif registered is not config_cls:
        raise RegistrationError(f"Another class ({registered!r}) is already registered for PeftType.{name}.")
    if (
        PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is not config_cls
        or PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is not model_cls
        or PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type) != model_cls.prefix
    ):
        raise RegistrationError(f"peft {peft.__version__}: registering {name} did not fill peft's method mappings.")
    return peft_type
