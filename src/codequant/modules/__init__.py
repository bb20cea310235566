"""Quantized modules; importing the package registers every module kind (see :mod:`.registry`)."""

from . import experts, linear, norm, router  # noqa: F401  (each module file registers its kind)
