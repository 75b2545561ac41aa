"""Map the component folders into the ``remora`` namespace.

``remora.converter`` lives in ``converter/``, ``remora.snapshotter`` in ``snapshotter/`` and
``remora.plugins`` in ``plugins/``; every sub-package below them is found automatically, so a new
module never needs an edit here.
"""
from setuptools import find_packages, setup

ROOTS = {
    "remora": "remora",
    "remora.converter": "converter",
    "remora.snapshotter": "snapshotter",
    "remora.plugins": "plugins",
    "remora.placement": "placement",
}

packages, package_dir = [], {}
for name, path in ROOTS.items():
    package_dir[name] = path
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(path)]

setup(packages=packages, package_dir=package_dir, package_data={"remora": ["_proto/*.pyi"]})
