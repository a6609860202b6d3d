"""`lm_eval --model gptlab` in lm-eval releases that read no plugin entry points (0.4.13 and older).

gptlab declares its model in the `lm_eval.models` entry-point group, the group lm-eval's plugin mechanism reads
(EleutherAI/lm-evaluation-harness pull request 4013, in no release up to 0.4.13). Releases without it look
`--model` up only in their built-in table, so gptlab also installs `gptlab-lm-eval.pth`, which calls `install()`
at interpreter start. `install` only adds an import hook: when lm-eval imports `lm_eval.models` (its table of
built-in models), the hook registers gptlab's entry points there under their names as "module:Class"
placeholders, the lazy form lm-eval uses for its own models, so nothing of lm-eval or of the plugin is imported
before lm-eval itself is. An lm-eval that reads the group itself is left to do so. This module imports only `sys`
when loaded (not even `typing`): every Python start in the environment runs it.
"""

from __future__ import annotations

import sys

GROUP = "lm_eval.models"  # lm-eval's entry-point group for model backends
DISTRIBUTION = "gptlab"
HOOKED = "lm_eval.models"  # the module whose import registers lm-eval's own models


class RegisterAfterImport:
    """A meta path finder that lets the other finders load `lm_eval.models`, then registers gptlab's models."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        """None for every module but `lm_eval.models`, whose spec's loader then calls `register` after it."""
        if name != HOOKED:
            return None
        sys.meta_path.remove(self)  # once is enough; the other finders find the real module
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: object) -> None:
            run(module)
            register()

        spec.loader.exec_module = exec_module  # this spec's own loader object: nothing else sees the change
        return spec


def register() -> list[str]:
    """Register gptlab's `lm_eval.models` entry points with a loaded lm-eval that does not read the group itself;
    return the names added (none when lm-eval has them already)."""
    from importlib import metadata

    from lm_eval.api import registry

    if hasattr(registry, "load_plugins"):  # lm-eval's own plugin discovery finds the entry points
        return []
    try:
        points = metadata.distribution(DISTRIBUTION).entry_points.select(group=GROUP)
    except metadata.PackageNotFoundError:  # gptlab's source on sys.path, not installed: no entry points
        return []
    added = []
    for point in points:
        if point.name not in registry.model_registry:  # a built-in model of the same name wins, as upstream
            registry.model_registry.register(point.name, target=point.value)
            added.append(point.name)
    return added


def install() -> None:
    """Register gptlab's models with lm-eval once it loads its model table (now, if it has already)."""
    if HOOKED in sys.modules:
        register()
    elif not any(isinstance(f, RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterAfterImport())
