"""Checks a request against the catalog before anything is reserved: model, options, prompt, images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bot.catalog import Catalog, ModelSpec
from bot.commands import clean_prompt
from bot.errors import InvalidRequest, Listed
from bot.images import BrokenImage, inspect_image, sniff_mime
from bot.jobs import Options, Request

MAX_SEED = 2**32 - 1
MAX_REFERENCE_BYTES = 20_000_000


def model_spec(catalog: Catalog, name: str, available: Callable[[ModelSpec], bool]) -> ModelSpec:
    """The model a request names, if this bot has it and a provider serves it."""
    spec = catalog.get(name)
    if spec is None:
        raise InvalidRequest("error.unknown_model", model=name)
    if not available(spec):
        raise InvalidRequest("error.model_unavailable", model=spec.name)
    return spec


def check_reference_count(spec: ModelSpec, count: int) -> None:
    """Refuse `count` reference images that `spec` does not take (checked again at submit, and
    by an adapter before it downloads them)."""
    if not count:
        return
    if not spec.reference_images:
        raise InvalidRequest("error.refs_not_supported", model=spec.name)
    if count > spec.max_reference_images:
        raise InvalidRequest("error.too_many_refs", model=spec.name, max=spec.max_reference_images)


def validate_request(
    request: Request,
    catalog: Catalog,
    default_model: str,
    available: Callable[[ModelSpec], bool],
    max_prompt_chars: int,
) -> tuple[ModelSpec, str, Options]:
    """The model, the cleaned prompt and the options with the model's defaults filled in."""
    prompt = clean_prompt(request.prompt)
    if not prompt:
        raise InvalidRequest("error.empty_prompt")
    if len(prompt) > max_prompt_chars:
        raise InvalidRequest("error.prompt_too_long", length=len(prompt), max=max_prompt_chars)
    spec = model_spec(catalog, request.model or default_model, available)
    o = request.options
    if not 1 <= o.n <= spec.max_images:
        raise InvalidRequest(
            "error.too_many_images", value=o.n, model=spec.name, max=spec.max_images
        )
    ratio = o.aspect_ratio or spec.default_aspect_ratio
    if ratio not in spec.aspect_ratios:
        allowed = Listed(", ".join(spec.aspect_ratios))
        raise InvalidRequest(
            "error.ratio_not_supported", value=ratio, model=spec.name, allowed=allowed
        )
    size = spec.default_size
    if o.size is not None:
        size = next((s for s in spec.sizes if s.lower() == o.size.lower()), None)
        if size is None:
            allowed = Listed(", ".join(spec.sizes) or "-")
            raise InvalidRequest(
                "error.size_not_supported", value=o.size, model=spec.name, allowed=allowed
            )
    if o.seed is not None and not 0 <= o.seed <= MAX_SEED:
        raise InvalidRequest("error.bad_seed", value=o.seed)
    refs = request.reference_images
    if refs:
        check_reference_count(spec, len(refs))
        for data in refs:
            if len(data) > MAX_REFERENCE_BYTES or sniff_mime(data) is None:
                raise InvalidRequest("error.reference_unreadable")
    return spec, prompt, Options(aspect_ratio=ratio, n=o.n, size=size, seed=o.seed)


def check_references(images: Sequence[bytes]) -> None:
    """Raise `InvalidRequest` unless each reference is a whole image within `MAX_PIXELS`.

    `validate_request` reads only their first bytes; this reads them through (a thread's work
    for big ones): a decompression bomb or a file cut short was otherwise sent to the provider,
    which bills the submit and fails the job, and the user heard of a provider error at best.
    """
    for data in images:
        try:
            inspect_image(data, MAX_REFERENCE_BYTES)
        except BrokenImage:
            raise InvalidRequest("error.reference_unreadable") from None
