"""The HTTP layer (FastAPI): settings, errors, middleware, schemas, the app factory and one router per surface.

Importing it loads nothing heavy: torch, diffusers and the concurrency core (``utils``) load with the model.
"""

from api.app import create_app
from api.settings import Settings, parse_settings

__all__ = ["Settings", "create_app", "parse_settings"]
