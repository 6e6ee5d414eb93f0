"""Generates the gRPC stubs from proto/ as part of every build (wheel or editable)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithProtos(build_py):
    def run(self) -> None:
        # Loaded by path: the build runs in an isolated environment where the project
        # itself is not importable yet.
        spec = importlib.util.spec_from_file_location("_protogen", HERE / "loraserve" / "protogen.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate()
        # In a clean tree loraserve/v1 did not exist when setuptools looked for packages.
        if self.packages is not None and "loraserve.v1" not in self.packages:
            self.packages.append("loraserve.v1")
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
