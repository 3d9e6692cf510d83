"""Registers ESFT as a real peft method.

peft's ``PeftType`` is a closed ``str`` enum and ``register_peft_method`` only accepts names that are already
members of it. We therefore add an ``ESFT`` member to the enum (the only touch of enum internals, isolated here),
then call peft's official registration. Both steps are idempotent and verified; if peft changes the enum or the
registry in a way this code does not understand, import fails loudly instead of half-working.
"""

from __future__ import annotations

import enum

import peft
from peft.utils import PeftType, register_peft_method

PEFT_TYPE_NAME = "ESFT"


class RegistrationError(RuntimeError):
    """Raised when peft's internals no longer allow registering ESFT."""


def _extend_peft_type(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    required = ("_member_map_", "_member_names_", "_value2member_map_")
    if not issubclass(PeftType, str) or not all(hasattr(PeftType, attr) for attr in required):
        raise RegistrationError(
            f"peft {peft.__version__}: PeftType is no longer a str Enum with the expected internals; "
            "esft-peft cannot register the 'ESFT' method. Please report this with your peft version."
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


def register_esft() -> PeftType:
    """Make ``"ESFT"`` a peft method (idempotent). Returns the ``PeftType.ESFT`` member."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from .config import ESFTConfig
    from .model import ESFTModel

    _extend_peft_type(PEFT_TYPE_NAME)
    peft_type = _verify_peft_type(PEFT_TYPE_NAME)
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=ESFTConfig, model_cls=ESFTModel, prefix=ESFTModel.prefix)
    elif registered is not ESFTConfig:
        raise RegistrationError(f"Another class ({registered!r}) is already registered for PeftType.ESFT.")
    if (
        PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is not ESFTConfig
        or PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is not ESFTModel
        or PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type) != ESFTModel.prefix
    ):
        raise RegistrationError(f"peft {peft.__version__}: registering ESFT did not fill peft's method mappings.")
    return peft_type
