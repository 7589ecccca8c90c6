"""Build step of the wheel: ship the recipe configs and DeepSpeed configs inside the package.

The repository's ``recipes/configs/*.yaml`` and ``ds_configs/*.json`` stay the source of truth; ``build_py`` copies
them to ``deca_ds/_shipped/configs`` and ``deca_ds/_shipped/ds_configs`` in the build, so that a plain
``pip install`` has them (``deca-ds run --config default``; ``deca_ds.ds_config.shipped_dir`` finds them). A
checkout or an editable install reads the repository's folders directly. Everything else is in setup.cfg.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = {"configs": (ROOT / "recipes" / "configs", "*.yaml"), "ds_configs": (ROOT / "ds_configs", "*.json")}


class BuildPyWithShippedFiles(build_py):
    """``build_py``, then the shipped configs copied into the built package."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the repository's own folders
            return
        for kind, (src, pattern) in SHIPPED.items():
            dest = Path(self.build_lib) / "deca_ds" / "_shipped" / kind
            dest.mkdir(parents=True, exist_ok=True)
            for f in sorted(src.glob(pattern)):
                shutil.copy2(f, dest / f.name)


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
