"""Only one thing is here, the rest is in pyproject.toml: gptlab-lm-eval.pth, written at the top of site-packages
by wheel and editable installs alike, so that lm-eval releases without plugin discovery (0.4.13 and older) find
`lm_eval --model gptlab` (see src/gptlab/interop/lm_eval_bridge.py)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "gptlab-lm-eval.pth"
PTH_LINE = "import gptlab.interop.lm_eval_bridge as bridge; bridge.install()\n"  # run by `site` at every start


class BuildPyWithPth(build_py):
    """A wheel: the .pth at the top of the wheel, which is site-packages once installed."""

    def run(self) -> None:
        super().run()
        Path(self.build_lib, PTH).write_text(PTH_LINE)


class EditableWheelWithPth(editable_wheel):
    """`pip install -e .`: the .pth beside setuptools' own __editable__ one (a hook of setuptools' editable_wheel:
    if a later setuptools drops it, an editable install just lacks the .pth)."""

    def _install_namespaces(self, installation_dir: str, pth_prefix: str) -> None:
        super()._install_namespaces(installation_dir, pth_prefix)
        Path(installation_dir, PTH).write_text(PTH_LINE)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
