"""Which packages the wheel holds; everything else is in pyproject.toml. Every package under
jaxlm/ is found (a new one cannot be left out), plus jaxlm.configs: the top-level configs/
folder, mapped by [tool.setuptools.package-dir], which discovery cannot see."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["jaxlm", "jaxlm.*"]), "jaxlm.configs"])
