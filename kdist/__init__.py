"""kdist: knowledge distillation for skin-lesion classification on DermaMNIST."""

__version__ = "0.1.0"


class KdistError(Exception):
    """A problem with the user's input (data, config, weights, images).

    The CLI prints it as one line and exits with code 2, without a traceback.
    """
