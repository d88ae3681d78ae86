"""kdist: distributed knowledge distillation for skin-lesion classification (DermaMNIST by default; any
MedMNIST 2D set, image folder or CSV)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kdist")  # setup.cfg's, as installed: run_info.json and weights record it
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"


class KdistError(Exception):
    """A problem with the user's input (data, config, weights, images).

    The CLI prints it as one line and exits with code 2, without a traceback.
    """
