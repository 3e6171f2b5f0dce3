"""Merge methods: small pure functions over tensors, registered by name."""

from mergekit_lite.methods.base import MethodSpec, ParamSpec, Scope, merge_method
from mergekit_lite.methods.registry import METHODS, get_method

__all__ = ["METHODS", "MethodSpec", "ParamSpec", "Scope", "get_method", "merge_method"]
