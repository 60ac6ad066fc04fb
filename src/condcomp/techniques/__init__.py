"""The built-in techniques, one module each: settings dataclass, keyword-only builder, registration.

Importing this package imports every module in it, and each registers itself
(``condcomp.registry.load_builtin`` does this on first use), so a new technique is one new file here.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
