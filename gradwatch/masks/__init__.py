"""Masks over parameters: how they are found, checked on input, and measured."""

from gradwatch.masks.discover import discover_masks, explicit_watch, zeros_watches
from gradwatch.masks.validate import check_mask, check_mode, resolve_param
from gradwatch.masks.watch import MASK_MODES, MaskFigures, MaskWatch

__all__ = [
    "MASK_MODES",
    "MaskFigures",
    "MaskWatch",
    "check_mask",
    "check_mode",
    "discover_masks",
    "explicit_watch",
    "resolve_param",
    "zeros_watches",
]
