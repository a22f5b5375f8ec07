"""Builds the same package as pyproject.toml, which holds all of its metadata: `pip install .`, `python -m build`
and `python setup.py ...` all go through setuptools reading pyproject.toml."""
from setuptools import setup

setup()
