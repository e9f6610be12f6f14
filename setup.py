"""Packaging for nnunetv2-ohem.

Besides the usual metadata this installs ``nnunetv2_ohem-discovery.pth`` into site-packages so that stock
``nnUNetv2_train -tr nnUNetTrainerOHEMEMA`` finds our trainers without any environment variable
(see ``nnunetv2_ohem/_discovery.py``). Regular wheels get the file through ``build_py`` (it is copied into
``build_lib`` and listed in the outputs, so it lands in RECORD and ``pip uninstall`` removes it); editable
wheels ignore ``build_lib`` root files, so ``editable_wheel`` writes it into the editable wheel itself.
"""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
PTH = "nnunetv2_ohem-discovery.pth"


class BuildPyWithHook(build_py):
    def run(self):
        super().run()
        shutil.copyfile(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


class _StrategyWithHook:
    """Wraps setuptools' editable strategy so the editable wheel also carries our ``.pth``."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, wheel, files, mapping):
        self.inner(wheel, files, mapping)
        with open(os.path.join(HERE, PTH), "rb") as f:
            wheel.writestr(PTH, f.read())

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


class EditableWheelWithHook(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithHook(super()._select_strategy(*args, **kwargs))


VALDO_EXTRA = ["ranger21>=0.1,<0.2"]

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="nnunetv2-ohem",
    version="0.1.0",
    description="nnU-Net v2 plugin: OHEM-EMA, blob loss, mixed precision and DeepLab trainers, "
                "challenge converters and lesion-wise evaluation for small-lesion segmentation",
    long_description=long_description,
    long_description_content_type="text/markdown",
    # the only interpreter the CI runs (and constraints.txt was resolved for); widen when another is tested
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["nnunetv2_ohem", "nnunetv2_ohem.*"])
    + ["nnunetv2_ohem.dataset_conversion"],
    package_dir={"nnunetv2_ohem.dataset_conversion": "dataset_conversion"},
    include_package_data=True,
    package_data={"nnunetv2_ohem": ["_nnunet_ext/*.py", "demo/*.html", "compare/_ext/*.py"]},
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        # nnU-Net itself excludes 2.9.* (slow 3D convolutions); 2.13/2.14 are what we test on.
        "torch>=2.1.2,!=2.9.*,<2.15",
        "SimpleITK>=2.2,<3",
        "batchgenerators>=0.25.1,<0.26",
        "batchgeneratorsv2>=0.3,<0.4",
        "acvl-utils>=0.2.3,<0.3",
        "connected-components-3d>=3.12,<5",
        "numpy>=1.24,<3",
        "scipy>=1.10,<2",
        "pandas>=2.0,<4",
        "matplotlib>=3.7,<4",
        "tqdm>=4.60,<5",
        "nibabel>=5,<6",  # phantom writer (byte-reproducible .nii.gz)
        # MNI152 anatomy of the phantoms (shipped inside nilearn, no download): nnunetv2_ohem_phantoms and
        # nnunetv2_ohem_demo are installed commands, so it stays a requirement rather than an extra
        "nilearn>=0.10,<0.15",
    ],
    extras_require={
        # nnUNetTrainerBlobLoss_VALDO only (Kofler et al. used Ranger21); unmaintained, hence optional
        "valdo": VALDO_EXTRA,
        # nnunetv2_ohem_compare --launcher slurm (one SLURM job per run)
        "cluster": ["submitit>=1.5,<2"],
        "test": ["pytest>=8,<10", "MedPy>=0.5,<0.6", "submitit>=1.5,<2"] + VALDO_EXTRA,
    },
    entry_points={
        "console_scripts": [
            "nnunetv2_ohem_demo=nnunetv2_ohem.demo.cli:main",
            "nnunetv2_ohem_convert=nnunetv2_ohem.dataset_conversion.cli:main",
            "nnunetv2_ohem_evaluate=nnunetv2_ohem.evaluation.cli:main",
            "nnunetv2_ohem_plan=nnunetv2_ohem.plans.cli:main",
            "nnunetv2_ohem_phantoms=nnunetv2_ohem.phantoms.cli:main",
            "nnunetv2_ohem_compare=nnunetv2_ohem.compare.cli:main",
        ],
    },
    cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)
