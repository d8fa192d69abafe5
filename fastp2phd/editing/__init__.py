"""Interactive editing of scenes with a trained pix2pixHD: the EditSession API and the web editor."""
from .session import EditSession

__all__ = ["EditSession"]
