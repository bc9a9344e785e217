"""``<lora:name:weight>`` in an A1111 prompt: the adapters it selects, and the text that is encoded without the tags.

As A1111 does it: every ``<type:arguments>`` tag is taken out of the prompt (nothing else is touched: the commas
and spaces around it stay) and the ``lora`` ones (``lyco``, LyCORIS' old name, too) select the server's LoRA
adapters by name, with the weight as the scale (1 when none is given), exactly as the native ``loras`` field would.
Refused with a 400 that names them: adapters the server does not have, another type of tag (hypernetworks ...), a
tag with more than one weight, a weight that is not a number or is outside the scale's bounds, an adapter named
twice, more adapters than a request may use. The negative prompt is left as it is (A1111 applies no tag there).
"""

from __future__ import annotations

import re

from fastapi import Request

from api.errors import APIError
from api.models import model_of
from api.schemas import MAX_LORA_SCALE, MAX_LORAS_PER_REQUEST

__all__ = ["lora_tags"]

_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_TYPES = ("lora", "lyco")


def _bad(message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"prompt: {message}", param="prompt", code=code)


def _weight(tag: str, text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise _bad(f"{tag[:80]}: the weight must be a number, e.g. <lora:name:0.8>") from None
    if not -MAX_LORA_SCALE <= weight <= MAX_LORA_SCALE:  # NaN fails too
        raise _bad(f"{tag[:80]}: the weight must be between {-MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}")
    return weight


def _parse(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its tags, and the adapters its lora tags name (in order)."""
    chosen: list[tuple[str, float]] = []
    for match in _TAG.finditer(prompt):
        kind, arguments, tag = match.group(1), match.group(2), match.group(0)
        if kind.lower() not in LORA_TYPES:
            what = f"extra networks of type {kind[:32]!r} are not available here; only <lora:name:weight>"
            raise _bad(f"{tag[:80]}: {what}")
        name, *weights = (part.strip() for part in arguments.split(":"))
        if len(weights) > 1:
            raise _bad(f"{tag[:80]}: give one weight, e.g. <lora:{name[:64]}:0.8>")
        if any(name == known for known, _ in chosen):
            raise _bad(f"adapter {name[:64]!r} is named twice")
        chosen.append((name, _weight(tag, weights[0]) if weights else 1.0))
    if len(chosen) > MAX_LORAS_PER_REQUEST:
        raise _bad(f"at most {MAX_LORAS_PER_REQUEST} LoRA adapters per request")
    return _TAG.sub("", prompt), chosen


def lora_tags(request: Request, prompt: str, disabled: bool) -> tuple[str, list[tuple[str, float]]]:
    """(the text to encode, the adapters chosen); ``disabled`` (A1111's ``disable_extra_networks``): the tags are
        still taken out, none applied. 400 naming every adapter the request's model does not have (or the model whose
    adapter it is: ``api.models.use_model`` has routed the request)."""
    text, chosen = _parse(prompt)
    if disabled or not chosen:
        return text, []
    model = model_of(request)
    names = set(model.adapter_names())
    unknown = [name for name, _ in chosen if name not in names]
    for name in unknown:
        owner = request.app.state.models.owner_of(name)
        if owner is not None:  # several models: the adapter is another model's
            message = f"LoRA adapter {name[:64]!r} belongs to model {owner!r}, not to {model.name!r}"
            raise _bad(f"{message}; set sd_model_checkpoint to {owner!r} to use it", "adapter_of_another_model")
    if unknown:
        listed = ", ".join(sorted(names)) if names else "none are configured (--lora, --lora-dir)"
        missing = ", ".join(repr(name[:64]) for name in unknown)
        raise _bad(f"unknown LoRA adapter(s) {missing}; known adapters: {listed}", "unknown_adapter")
    return text, chosen
