"""Errors raised when a model's MoE structure cannot be used."""

from __future__ import annotations


class NotAnMoEModelError(ValueError):
    """The model has no mixture-of-experts layer that esft-peft can adapt."""


class UnsupportedLayoutError(ValueError):
    """The experts of a layer are stored or called in a way an operation does not support."""


class RoutingReadError(RuntimeError):
    """A hooked module did not expose a routing decision that can be read."""
