"""The AUTOMATIC1111 API (``/sdapi/v1/...``): the routes its clients call, on this server's engine (``api.a1111``).

Generation (txt2img, img2img), progress, interrupt and skip, the options, and the lists clients fill their menus
from. With ``--api-key``, HTTP Basic credentials carrying the key are accepted on these paths as well as Bearer
(``api.middleware``). docs/api/a1111.md says what maps, what is ignored and what is refused.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from api.a1111.mapping import AUTOMATIC, EULER, img2img_plan, txt2img_plan
from api.a1111.options import check_settings, model_entries, state_of
from api.a1111.progress import idle_answer
from api.a1111.run import answer
from api.a1111.schemas import (
    CHECKPOINT_FIELD,
    A1111Response,
    ActedOn,
    Img2ImgRequest,
    LoraItem,
    ModelItem,
    ProgressAnswer,
    SamplerItem,
    SchedulerItem,
    Txt2ImgRequest,
)
from api.deps import ready_engine

__all__ = ["PATHS", "router"]

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 API"])
PATHS = frozenset({"/sdapi/v1/img2img"})  # the routes whose bodies carry images (--max-upload-bytes)
TaskQuery = Annotated[str | None, Query(max_length=128, description="a request's force_task_id or X-Request-ID")]


@router.post("/txt2img", response_model=A1111Response, summary="A1111: generate images from a prompt")
async def txt2img(body: Txt2ImgRequest, request: Request) -> JSONResponse:
    ready_engine(request)  # 503 while loading, before the limits (which depend on the model) are checked
    return await answer(request, body, await txt2img_plan(request, body))


@router.post("/img2img", response_model=A1111Response, summary="A1111: image-to-image, or inpainting with a mask")
async def img2img(body: Img2ImgRequest, request: Request) -> JSONResponse:
    ready_engine(request)
    return await answer(request, body, await img2img_plan(request, body))


def _in_flight(request: Request) -> int:
    engine = request.app.state.engine
    return 0 if engine is None else engine.active + engine.queued


@router.get("/progress", response_model=ProgressAnswer, summary="A1111: progress of a running request")
async def progress(
    request: Request,
    skip_current_image: Annotated[bool, Query(description="leave the preview out")] = False,
    id_task: TaskQuery = None,
) -> dict[str, Any]:
    board = state_of(request).board
    task = board.pick(id_task)
    if task is None:
        return idle_answer(_in_flight(request))
    return await board.answer(task, _in_flight(request), not skip_current_image)


@router.post("/interrupt", response_model=ActedOn, summary="A1111: stop a request (every image of it)")
async def interrupt(request: Request, id_task: TaskQuery = None) -> dict[str, Any]:
    task = state_of(request).board.pick(id_task)
    if task is not None:
        task.interrupt()
    return {"job": None if task is None else task.id}


@router.post("/skip", response_model=ActedOn, summary="A1111: stop a request's running images, go on with the rest")
async def skip(request: Request, id_task: TaskQuery = None) -> dict[str, Any]:
    task = state_of(request).board.pick(id_task)
    if task is not None:
        task.skip()
    return {"job": None if task is None else task.id}


@router.get("/options", summary="A1111: the options (the checkpoint among them)")
async def get_options(request: Request) -> dict[str, Any]:
    return dict(state_of(request).options)


@router.post("/options", summary="A1111: set options; the ones this server has not are ignored")
async def set_options(body: dict[str, Any], request: Request) -> dict[str, Any]:
    applied, _ = check_settings(body, request)
    options = state_of(request).options
    options.update(applied)
    return dict(options)


@router.get("/sd-models", response_model=list[ModelItem], summary="A1111: the checkpoints (every served model)")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    return model_entries(request)


@router.get("/samplers", response_model=list[SamplerItem], summary="A1111: the samplers that run here")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": EULER, "aliases": ["k_euler"], "options": {"scheduler": "flow-matching Euler (SD3's own)"}}]


@router.get("/schedulers", response_model=list[SchedulerItem], summary="A1111: the schedules that run here")
async def schedulers() -> list[dict[str, Any]]:
    name = AUTOMATIC.lower()
    return [{"name": name, "label": AUTOMATIC, "aliases": None, "default_rho": -1, "need_inner_model": False}]


@router.get("/loras", response_model=list[LoraItem], summary="A1111: the LoRA adapters (<lora:name:weight>)")
async def loras(request: Request) -> list[dict[str, Any]]:
    """The adapters of the model this API runs on (its ``sd_model_checkpoint``)."""
    names = request.app.state.models.adapters_of(state_of(request).options[CHECKPOINT_FIELD])
    return [{"name": name, "alias": name, "path": None, "metadata": {}} for name in names]


@router.get("/upscalers", response_model=list[dict[str, Any]], summary="A1111: upscalers (none here)")
async def upscalers() -> list[dict[str, Any]]:
    return []


@router.get("/latent-upscale-modes", response_model=list[dict[str, Any]], summary="A1111: latent upscalers (none)")
async def latent_upscale_modes() -> list[dict[str, Any]]:
    return []


@router.get("/sd-vae", response_model=list[dict[str, Any]], summary="A1111: separate VAEs (none: the model's own)")
async def sd_vae() -> list[dict[str, Any]]:
    return []


@router.get("/prompt-styles", response_model=list[dict[str, Any]], summary="A1111: prompt styles (none here)")
async def prompt_styles() -> list[dict[str, Any]]:
    return []


@router.get("/scripts", summary="A1111: scripts (none here)")
async def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/embeddings", summary="A1111: textual inversion embeddings (none here)")
async def embeddings() -> dict[str, dict[str, Any]]:
    return {"loaded": {}, "skipped": {}}
