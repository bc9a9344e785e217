"""The settings of the models a server holds (issue 30): ``--model`` (repeatable, ``NAME=SOURCE`` or ``SOURCE``),
``--models-file``, ``--strict-model-names``, ``--preload``, ``--pin``, ``--cpu-memory-budget``, and which model each
``--lora`` / ``--lora-dir`` belongs to. ``Settings`` inherits them; they are flags and SERVER_* variables like every
other option, validated before any model loads.

One ``--model`` (and no models file) is a server of one model, exactly as before. Two or more, or a models file, make
a server of several (docs/operations/several-models.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode

from registry.specs import ModelSpec, apply_flags, parse_model_options, read_models_file

__all__ = ["DEFAULT_MODEL", "ModelsSettings", "split_model_prefix", "strip_model_prefix"]

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
_PREFIX = re.compile(r"^(?P<model>[A-Za-z0-9][A-Za-z0-9._-]{0,63}):(?P<rest>.+)$")


def _listed(value: Any) -> Any:
    """The environment's form of a repeatable option: comma-separated."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def strip_model_prefix(value: str) -> str:
    """``value`` without a leading ``MODEL:`` (any name: which models exist is checked later)."""
    match = _PREFIX.match(value.strip())
    return match["rest"].strip() if match else value.strip()


def split_model_prefix(value: str, models: list[str], default: str) -> tuple[str, str]:
    """``MODEL:REST`` -> (MODEL, REST) when MODEL is one of ``models``; anything else belongs to ``default``."""
    match = _PREFIX.match(value.strip())
    if match and match["model"] in models:
        return match["model"], match["rest"].strip()
    return default, value.strip()


class ModelsSettings(BaseSettings):
    """The models' options (docs/operations/several-models.md)."""

    model: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_MODEL],
        validation_alias=AliasChoices("model", "SERVER_MODEL", "MODEL_PATH"),
        description="the model to serve: a hub id, a local save_pretrained directory, or random:tiny / "
        "random:sd3.5-medium; repeat the flag for several, each NAME=SOURCE (the first is the default) "
        "(environment: comma-separated) (env SERVER_MODEL or MODEL_PATH) "
        f"(default: {DEFAULT_MODEL})",
    )
    models_file: str | None = Field(
        None,
        description="a TOML file of [[model]] tables (name, source, default, preload, pin), served with any --model "
        "given too (default: none)",
    )
    strict_model_names: bool = Field(
        False,
        description="a request naming a model the server does not have is answered 404 model_not_found (default: "
        "off, it goes to the default model)",
    )
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="several models: a model loaded at start-up (the default always is); repeat the flag for more "
        "(default: none, loaded on first use)",
    )
    pin: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="several models: a model never unloaded to make room; repeat the flag for more (default: none)",
    )
    cpu_memory_budget: str = Field(
        "0",
        description="several models on a GPU: memory of the CPU tier, where a model unloaded from the GPU waits "
        "to come back in seconds: bytes, a size (16GB) or a fraction of the machine's memory (0: no CPU tier)",
    )

    @field_validator("model", "preload", "pin", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _listed(value)

    @field_validator("model")
    @classmethod
    def _check_models(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one model")
        parse_model_options(value)
        return value

    @field_validator("preload", "pin")
    @classmethod
    def _check_names(cls, value: list[str]) -> list[str]:
        from registry.specs import NAME_PATTERN

        for name in value:
            if not NAME_PATTERN.fullmatch(name) and ":" not in name and "/" not in name:
                raise ValueError(f"{name!r} is not a model's name (--model NAME=SOURCE names one)")
        return value

    @field_validator("models_file")
    @classmethod
    def _check_models_file(cls, value: str | None) -> str | None:
        if value:
            read_models_file(value)
        return value

    @field_validator("cpu_memory_budget")
    @classmethod
    def _check_cpu_budget(cls, value: str) -> str:
        from registry.memory import parse_memory

        if value.strip() != "0":  # 0: none
            parse_memory(value, 1)
        return value.strip()

    @model_validator(mode="after")
    def _check_marked(self) -> ModelsSettings:
        self.model_specs  # noqa: B018 - raises for a name given twice, an unknown --preload / --pin
        return self

    @property
    def model_specs(self) -> list[ModelSpec]:
        """Every configured model: the models file's, then the ``--model`` ones given with it (without a file, the
        ``--model`` ones, or the default model), marked with ``--preload`` and ``--pin``."""
        specs: list[ModelSpec] = []
        if self.models_file:
            specs = read_models_file(self.models_file)
            if "model" in self.model_fields_set:
                specs = [*specs, *parse_model_options(self.model)]
        else:
            specs = parse_model_options(self.model)
        default = next((spec.name for spec in specs if spec.default), None)
        return apply_flags(specs, default, self.preload, self.pin)

    @property
    def several_models(self) -> bool:
        """Whether this server holds several models (a registry) rather than one (the server as it always was)."""
        return bool(self.models_file) or len(self.model) > 1

    @property
    def default_model(self) -> str:
        """The default model's name as configured (a bare source's name is the source itself)."""
        return self._names_and_default()[1]

    @property
    def model_source(self) -> str:
        """What the default model is loaded from."""
        return next(spec.source for spec in self.model_specs if spec.default)

    def lora_dirs(self) -> dict[str, Path]:
        """``--lora-dir [MODEL:]DIR`` as {model: directory} (no MODEL: the default model's)."""
        names, default = self._names_and_default()
        dirs: dict[str, Path] = {}
        for value in getattr(self, "lora_dir", None) or []:
            model, path = split_model_prefix(value, names, default)
            if model in dirs:
                raise ValueError(f"--lora-dir: model {model!r} is given two adapter folders")
            directory = Path(path).expanduser()
            if not directory.is_dir():
                raise ValueError(f"{path}: no such directory (make it, or name another)")
            dirs[model] = directory
        return dirs

    def loras_by_model(self) -> dict[str, list[str]]:
        """``--lora [MODEL:]NAME=PATH`` as {model: [NAME=PATH, ...]} (no MODEL: the default model's)."""
        names, default = self._names_and_default()
        grouped: dict[str, list[str]] = {}
        for value in getattr(self, "lora", None) or []:
            model, entry = split_model_prefix(value, names, default)
            grouped.setdefault(model, []).append(entry)
        return grouped

    def _names_and_default(self) -> tuple[list[str], str]:
        specs = self.model_specs
        return [spec.name for spec in specs], next(spec.name for spec in specs if spec.default)
