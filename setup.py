"""Generates the gRPC stubs from proto/ as part of every build (wheel or editable)."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        from loraserve.protogen import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
