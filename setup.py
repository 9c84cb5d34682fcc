"""configs/ (top level in the repository, see ARCHITECTURE.md) ships inside the wheel as ``serve/configs``, where
``moe-serve`` finds it when it is not running from a checkout. Everything else is in pyproject.toml."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        self.copy_tree("configs", f"{self.build_lib}/serve/configs")


setup(cmdclass={"build_py": BuildWithConfigs})
