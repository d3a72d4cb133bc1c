"""What every process's settings share: defaults < TOML file < EDGEFLEET_* environment
(nested with __) < explicit overrides (command-line options)."""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Self

from pydantic import SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

from edgefleet.core.errors import InvalidArgument

# The TOML file of the construction in progress; a context variable rather than class
# state, so two processes' settings (or two threads) never see each other's file.
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("edgefleet_config_file", default=None)


class LayeredSettings(BaseSettings):
    """Base of each process's one settings model."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _CONFIG_FILE.get()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @classmethod
    def from_sources(cls, config_file: Path | None = None, **overrides: Any) -> Self:
        """Settings from the TOML file (if any), the environment and `overrides`.

        Overrides that are None are ignored, so command-line options left unset fall
        through to the environment and the file.
        """
        if config_file is not None and not config_file.is_file():
            raise InvalidArgument(
                f"config file {config_file} does not exist; pass an existing TOML file"
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        token = _CONFIG_FILE.set(config_file)
        try:
            return cls(**given)
        finally:
            _CONFIG_FILE.reset(token)

    def describe(self) -> str:
        """One `name = value` line per setting, secrets masked: printed at start-up."""
        return "\n".join(
            f"  {name} = {self.shown(name, getattr(self, name))}"
            for name in type(self).model_fields
        )

    def shown(self, name: str, value: Any) -> str:
        """How one setting is printed; subclasses may override for a field of theirs."""
        if isinstance(value, SecretStr):
            return "********"
        if isinstance(value, list) and value and isinstance(value[0], SecretStr):
            return f"[{len(value)} secret(s), masked]"
        if isinstance(value, Path):
            return os.fspath(value)
        return repr(value)
