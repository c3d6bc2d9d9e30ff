"""linattn: linear-time attention, every mechanism behind one contract, on any device."""

from linattn import feature_maps, layers, models, ops

__version__ = "0.1.0"

__all__ = ["feature_maps", "layers", "models", "ops", "__version__"]
