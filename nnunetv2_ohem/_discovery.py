"""Zero-config trainer discovery for nnU-Net v2.

nnU-Net 2.8.1 resolves ``-tr NAME`` by searching its own ``training/nnUNetTrainer`` folder and then each
folder listed in the environment variable ``nnUNet_extTrainer`` (``os.pathsep``-separated, read at call
time). The installed ``nnunetv2_ohem-discovery.pth`` calls :func:`register` at interpreter start-up, which
appends our shim folder to that variable while keeping whatever the user already put there (their folders
are searched first, so a user's own trainer of the same name wins).

Only ``os`` is used here: this runs in every Python process of the environment, so importing torch or
nnunetv2 would cost every unrelated program seconds.
"""
import os

ENV_VAR = "nnUNet_extTrainer"
EXT_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_nnunet_ext")


def register(environ=os.environ) -> str:
    """Append our trainer folder to ``nnUNet_extTrainer`` (idempotent) and return the new value."""
    current = environ.get(ENV_VAR, "")
    parts = [p for p in current.split(os.pathsep) if p]
    if EXT_FOLDER not in parts:
        parts.append(EXT_FOLDER)
    value = os.pathsep.join(parts)
    environ[ENV_VAR] = value
    return value
