"""The shapes of A1111's API (``modules/api/models.py``), written for this server: the txt2img and img2img bodies with
every field A1111's clients send, and the answers they read.

Field by field, what applies here, what is accepted only at its neutral value and what is ignored is
``api.a1111.fields`` (and docs/api/a1111.md). Unknown fields are ignored, as A1111's own models ignore them; the types
are strict, as the other APIs' are (``true`` is not a step count), except that JSON integers fill float fields.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from api.schemas import Guidance, ImageString, Side, Steps

__all__ = [
    "CHECKPOINT_FIELD",
    "A1111Response",
    "ActedOn",
    "Img2ImgRequest",
    "LoraItem",
    "ModelItem",
    "ProgressAnswer",
    "SamplerItem",
    "SchedulerItem",
    "Txt2ImgRequest",
]

CHECKPOINT_FIELD = "sd_model_checkpoint"
Text = Annotated[str, Field(max_length=100_000)]
Name = Annotated[str, Field(max_length=256)]
Count = Annotated[int, Field(ge=1, le=64)]
# A1111's seed: -1 draws one; otherwise what the native API accepts.
A1111Seed = Annotated[int, Field(ge=-1, le=2**32 - 1, description="-1 (the default) draws one")]
TaskId = Annotated[str, Field(pattern=r"^[\x21-\x7e]{1,128}$", description="printable ASCII, at most 128")]
Small = Annotated[int, Field(ge=-1, le=65_536)]
Real = Annotated[float, Field(ge=-1e6, le=1e6)]


class A1111Common(BaseModel):
    """What txt2img and img2img share (A1111's ``StableDiffusionProcessing``)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: Text = ""
    negative_prompt: Text | None = ""
    styles: Annotated[list[Name], Field(max_length=64)] | None = None
    seed: A1111Seed = -1
    subseed: A1111Seed = -1
    subseed_strength: Annotated[float, Field(ge=0, le=1)] = 0.0
    seed_resize_from_h: Small = -1
    seed_resize_from_w: Small = -1
    sampler_name: Name | None = None
    sampler_index: Name | None = "Euler"
    scheduler: Name | None = None
    batch_size: Count = 1
    n_iter: Count = 1
    steps: Steps | None = Field(None, description="default: the server's --default-steps (A1111's own is 50)")
    cfg_scale: Guidance | None = Field(None, description="default: the pipeline's (7.0 for SD3, as A1111's)")
    width: Side | None = Field(None, description="default: the model's native size (A1111's own is 512)")
    height: Side | None = Field(None, description="default: the model's native size (A1111's own is 512)")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Real | None = None
    s_min_uncond: Real | None = None
    s_churn: Real | None = None
    s_tmax: Real | None = None
    s_tmin: Real | None = None
    s_noise: Real | None = None
    override_settings: Annotated[dict[str, Any], Field(max_length=256)] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Name | None = None
    refiner_switch_at: Real | None = None
    disable_extra_networks: bool = False
    comments: Annotated[dict[str, Any], Field(max_length=64)] | None = None
    script_name: Name | None = None
    script_args: Annotated[list[Any], Field(max_length=256)] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: Annotated[dict[str, Any], Field(max_length=64)] = Field(default_factory=dict)
    force_task_id: TaskId | None = Field(None, description="the id GET /sdapi/v1/progress?id_task= follows")
    infotext: Text | None = None


class Txt2ImgRequest(A1111Common):
    """Body of POST /sdapi/v1/txt2img. The hires fix fields apply only with ``enable_hr``, which is refused."""

    enable_hr: bool = False
    denoising_strength: Real | None = None
    firstphase_width: Small = 0
    firstphase_height: Small = 0
    hr_scale: Real = 2.0
    hr_upscaler: Name | None = None
    hr_second_pass_steps: Small = 0
    hr_resize_x: Small = 0
    hr_resize_y: Small = 0
    hr_checkpoint_name: Name | None = None
    hr_sampler_name: Name | None = None
    hr_scheduler: Name | None = None
    hr_prompt: Text = ""
    hr_negative_prompt: Text = ""


class Img2ImgRequest(A1111Common):
    """Body of POST /sdapi/v1/img2img."""

    init_images: Annotated[list[ImageString], Field(min_length=1, max_length=64)] | None = Field(
        None, description="base64 or data: URLs; image i of the answer starts from init_images[i % len]"
    )
    resize_mode: Annotated[int, Field(ge=0, le=3)] = 0
    denoising_strength: Annotated[float, Field(ge=0, le=1)] = 0.75
    image_cfg_scale: Real | None = None
    mask: ImageString | None = Field(None, description="white repaints, black keeps (A1111's convention)")
    mask_blur_x: Annotated[int, Field(ge=0, le=256)] = 4
    mask_blur_y: Annotated[int, Field(ge=0, le=256)] = 4
    mask_blur: Annotated[int, Field(ge=0, le=256)] | None = None
    mask_round: bool = True
    inpainting_fill: Annotated[int, Field(ge=0, le=3)] = 0
    inpaint_full_res: bool | Annotated[int, Field(ge=0, le=1)] = True
    inpaint_full_res_padding: Small = 0
    inpainting_mask_invert: bool | Annotated[int, Field(ge=0, le=1)] = 0
    initial_noise_multiplier: Real | None = None
    latent_mask: ImageString | None = None
    include_init_images: bool = False


class A1111Response(BaseModel):
    """txt2img's and img2img's answer: ``info`` is a JSON string (``api.a1111.infotext``)."""

    images: list[str] = Field(description="bare base64 images (PNG unless samples_format says otherwise), no grid")
    parameters: dict[str, Any] = Field(description="the request's fields, defaults filled (input images left out)")
    info: str = Field(description="a JSON object as a string: seeds, sizes, the sampler that ran, infotexts")


class ActedOn(BaseModel):
    """An empty answer where A1111 answers nothing useful (interrupt, skip): the task acted on, if any."""

    job: str | None = Field(None, description="the id of the request acted on; null when none was running")


class ProgressAnswer(BaseModel):
    progress: float = Field(description="0..1: the followed request's denoising steps done over all of its steps")
    eta_relative: float = Field(description="seconds left, from its step rate so far (0 before its first step)")
    state: dict[str, Any]
    current_image: str | None = Field(None, description="base64 PNG preview of the request's latest step")
    textinfo: str | None = None


class ModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str | None = Field(None, description="never a file system path here: null")
    metadata: dict[str, Any] = Field(default_factory=dict)
