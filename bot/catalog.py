"""The model catalog: name → provider, endpoint, prices, aspect ratios, sizes, limits.

The shipped `models.toml` is loaded first; an operator's TOML file (`MODELS_FILE`) is merged over
it table by table, so it can add models or change one field of a shipped one.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from bot.errors import SettingsError

# The model a provider serves when DEFAULT_MODEL names none.
PROVIDER_DEFAULTS = {
    "grsai": "nano-banana",
    "openai": "gpt-image-1",
    "gemini": "gemini-2.5-flash-image",
    "demo": "demo",
}


class CatalogError(SettingsError):
    """The models file is unreadable or describes a model that cannot work."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model as users name it, and how to call it."""

    name: str
    provider: str
    remote_model: str
    endpoint: str = ""
    family: str = ""
    price_usd: float = 0.0
    prices_by_size: Mapping[str, float] = field(default_factory=dict)
    aspect_ratios: tuple[str, ...] = ("1:1",)
    default_aspect_ratio: str = "1:1"
    sizes: tuple[str, ...] = ()
    default_size: str | None = None
    max_images: int = 1
    reference_images: bool = False
    max_reference_images: int = 0
    timeout_s: float = 300.0
    description: str = ""

    def price_for(self, size: str | None) -> float:
        """The price of one image at `size` (the base price where no size price is given)."""
        if size is not None:
            for key, price in self.prices_by_size.items():
                if key.lower() == size.lower():
                    return price
        return self.price_usd

    def cost(self, n: int, size: str | None) -> float:
        return round(n * self.price_for(size), 6)


_FIELDS = {
    "provider": str,
    "remote_model": str,
    "endpoint": str,
    "family": str,
    "price_usd": (int, float),
    "prices_by_size": dict,
    "aspect_ratios": list,
    "default_aspect_ratio": str,
    "sizes": list,
    "default_size": str,
    "max_images": int,
    "reference_images": bool,
    "max_reference_images": int,
    "timeout_s": (int, float),
    "description": str,
}


def _spec(name: str, table: Mapping[str, Any]) -> ModelSpec:
    def bad(message: str) -> CatalogError:
        return CatalogError(f"MODELS_FILE: model {name!r}: {message}")

    for key, value in table.items():
        expected = _FIELDS.get(key)
        if expected is None:
            raise bad(f"unknown field {key!r}")
        if isinstance(value, bool) and expected is not bool:
            raise bad(f"{key} has the wrong type")
        if not isinstance(value, expected):  # type: ignore[arg-type]
            raise bad(f"{key} has the wrong type")
    if "provider" not in table:
        raise bad("needs a provider")
    ratios = tuple(str(r) for r in table.get("aspect_ratios", ["1:1"]))
    sizes = tuple(str(s) for s in table.get("sizes", []))
    prices = {str(k): float(v) for k, v in table.get("prices_by_size", {}).items()}
    default_ratio = str(table.get("default_aspect_ratio", ratios[0] if ratios else "1:1"))
    default_size = table.get("default_size", sizes[0] if sizes else None)
    spec = ModelSpec(
        name=name,
        provider=str(table["provider"]),
        remote_model=str(table.get("remote_model", name)),
        endpoint=str(table.get("endpoint", "")),
        family=str(table.get("family", "")),
        price_usd=float(table.get("price_usd", 0.0)),
        prices_by_size=prices,
        aspect_ratios=ratios,
        default_aspect_ratio=default_ratio,
        sizes=sizes,
        default_size=default_size,
        max_images=int(table.get("max_images", 1)),
        reference_images=bool(table.get("reference_images", False)),
        max_reference_images=int(
            table.get("max_reference_images", 1 if table.get("reference_images") else 0)
        ),
        timeout_s=float(table.get("timeout_s", 300.0)),
        description=str(table.get("description", "")),
    )
    if not ratios:
        raise bad("needs at least one aspect ratio")
    if default_ratio not in ratios:
        raise bad(f"default_aspect_ratio {default_ratio!r} is not in aspect_ratios")
    if sizes and default_size not in sizes:
        raise bad(f"default_size {default_size!r} is not in sizes")
    if not all(math.isfinite(p) and p >= 0 for p in (spec.price_usd, *prices.values())):
        raise bad("prices must be numbers of dollars, not negative, nan or inf")
    if not 1 <= spec.max_images <= 10:
        raise bad("max_images must be 1 to 10")
    if not (math.isfinite(spec.timeout_s) and spec.timeout_s > 0):
        raise bad("timeout_s must be a positive number of seconds")
    return spec


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise CatalogError(f"MODELS_FILE: cannot read {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"MODELS_FILE: {path} is not valid TOML ({exc})") from None
    models = data.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise CatalogError(f"MODELS_FILE: {path} needs [models.<name>] tables")
    return models


class Catalog:
    """Every model drawbridge knows, looked up case-insensitively by name."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs = {spec.name.lower(): spec for spec in specs}

    @classmethod
    def load(cls, extra: Path | None = None) -> Catalog:
        """The shipped models, with `extra`'s tables merged over them."""
        shipped = resources.files("bot").joinpath("models.toml")
        with resources.as_file(shipped) as path:
            tables = _read(path)
        if extra is not None:
            for name, table in _read(extra).items():
                tables[name] = {**tables.get(name, {}), **table}
        return cls(_spec(name, table) for name, table in tables.items())

    def get(self, name: str) -> ModelSpec | None:
        return self._specs.get(name.strip().lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        return [spec.name for spec in self._specs.values()]

    def for_provider(self, provider: str) -> list[ModelSpec]:
        return [spec for spec in self._specs.values() if spec.provider == provider]

    def default_model(self, configured: Iterable[str], preferred: str | None = None) -> str:
        """`preferred` when it is known; else the first configured provider's default; else demo."""
        if preferred is not None:
            spec = self.get(preferred)
            if spec is None:
                raise CatalogError(f"DEFAULT_MODEL: unknown model {preferred!r}")
            return spec.name
        for provider in configured:
            name = PROVIDER_DEFAULTS.get(provider)
            spec = self.get(name) if name else None
            if spec is None:
                spec = next(iter(self.for_provider(provider)), None)
            if spec is not None:
                return spec.name
        return "demo"
