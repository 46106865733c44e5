"""Names of a package that load on first use (PEP 562), for packages whose light modules are imported by
processes that must not pay for the heavy ones (Ray Data read tasks, the LLM jobs' workers)."""

import importlib


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """(__getattr__, __dir__) for `package`: each name in `exports` is imported from its module on first use and
    then kept in `namespace` (the package's globals())."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted([*namespace, *exports])

    return __getattr__, __dir__
