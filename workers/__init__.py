"""The packet path. The supervisor knows only ``run``."""
from .main import run

__all__ = ["run"]
