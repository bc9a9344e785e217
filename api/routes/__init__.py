"""One APIRouter per surface; ``api.app.create_app`` includes them all."""

from api.routes import a1111, edits, jobs, native, openai, ops, ui

ROUTERS = (ops.router, native.router, jobs.router, openai.router, edits.router, a1111.router, ui.router)

# The routes whose bodies may carry images: held to --max-upload-bytes, not --max-body-bytes (api.middleware).
UPLOAD_PATHS = frozenset({"/api/diffusers/inference", "/api/jobs", *edits.PATHS, *a1111.PATHS})

__all__ = ["ROUTERS", "UPLOAD_PATHS"]
