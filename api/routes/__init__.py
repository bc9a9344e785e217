"""One APIRouter per surface; ``api.app.create_app`` includes them all."""

from api.routes import jobs, native, openai, ops, ui

ROUTERS = (ops.router, native.router, jobs.router, openai.router, ui.router)

__all__ = ["ROUTERS"]
