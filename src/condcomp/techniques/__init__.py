"""The built-in techniques, one module each: settings dataclass, keyword-only builder, registration.

Importing this package registers them all (``condcomp.registry.load_builtin`` does, on first use).
The import order is the order of the settings sections in a saved config.
"""

from condcomp.techniques import dense, moe, mod, skip, colt5, sru  # noqa: F401  (each registers itself)
