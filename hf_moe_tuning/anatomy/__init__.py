"""Model anatomy: which parameter is in which group, and where the MoE layers are."""

from .families import DEFAULT_FAMILY, MOE_FAMILIES, MoEFamily, get_family
from .groups import (
    MoEAnatomy,
    MoELayer,
    NoMoELayersError,
    ParamGroup,
    UnclassifiedParameterError,
    UnsupportedMoEFamilyError,
    anatomy_for,
    classify_parameters,
    describe_moe,
    find_moe_layers,
    require_moe,
)

__all__ = [
    "DEFAULT_FAMILY",
    "MOE_FAMILIES",
    "MoEAnatomy",
    "MoEFamily",
    "MoELayer",
    "NoMoELayersError",
    "ParamGroup",
    "UnclassifiedParameterError",
    "UnsupportedMoEFamilyError",
    "anatomy_for",
    "classify_parameters",
    "describe_moe",
    "find_moe_layers",
    "get_family",
    "require_moe",
]
