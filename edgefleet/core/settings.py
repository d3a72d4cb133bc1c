"""What every process's settings share: defaults < TOML file < its own environment prefix
(nested fields with __) < explicit overrides (command-line options).

Each process has its own prefix (the cloud EDGEFLEET_CLOUD_, the agent EDGEFLEET_AGENT_), so
one process's variables never move another, and each refuses what it does not know: a
misspelt key in the TOML file or a misspelt variable under its prefix is an error naming
the settings it has, not a silent default.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

from edgefleet.core.errors import InvalidArgument

if TYPE_CHECKING:
    from typing_extensions import Self  # typing's own from 3.11

log = logging.getLogger(__name__)
# What the admin commands read (edgefleet.client): not a process's setting.
CLIENT_VARIABLES = frozenset(
    {
        "EDGEFLEET_CLOUD",
        "EDGEFLEET_ADMIN_TOKEN",
        "EDGEFLEET_ADMIN_TOKEN_FILE",
        "EDGEFLEET_CA_FILE",
        "EDGEFLEET_INSECURE",
    }
)

# The TOML file of the construction in progress; a context variable rather than class
# state, so two processes' settings (or two threads) never see each other's file.
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("edgefleet_config_file", default=None)

LogFormat = Literal["text", "json"]


class LayeredSettings(BaseSettings):
    """Base of each process's one settings model; subclasses set `env_prefix`."""

    log_format: LogFormat = Field(
        "text", description="text (date, level, logger, message) or json (one object a line)."
    )

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
    def env_prefix(cls) -> str:
        return str(cls.model_config.get("env_prefix", ""))

    @classmethod
    def from_sources(
        cls,
        config_file: Path | None = None,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Self:
        """Settings from the TOML file (if any), the environment and `overrides`.

        Overrides that are None are ignored, so command-line options left unset fall
        through to the environment and the file. InvalidArgument names what is wrong.
        """
        if config_file is not None and not config_file.is_file():
            raise InvalidArgument(
                f"config file {config_file} does not exist; pass an existing TOML file"
            )
        cls._refuse_unknown_variables(os.environ)
        given = {k: v for k, v in overrides.items() if v is not None}
        token = _CONFIG_FILE.set(config_file)
        try:
            return cls(**given)
        except ValidationError as err:
            raise InvalidArgument(describe_validation(err, cls, config_file)) from None
        finally:
            _CONFIG_FILE.reset(token)

    @classmethod
    def _refuse_unknown_variables(cls, environ: Mapping[str, str]) -> None:
        prefix = cls.env_prefix()
        if not prefix:
            return
        known = set(cls.model_fields)
        for field in known:
            # Before each process had its own prefix they shared EDGEFLEET_; say so rather
            # than ignore it (the admin client's two variables are its own, not ours).
            old = f"EDGEFLEET_{field.upper()}"
            if old in environ and old not in CLIENT_VARIABLES:
                log.warning("%s is ignored: this process reads %s%s", old, prefix, field.upper())
        for name in environ:
            if not name.upper().startswith(prefix.upper()):
                continue
            field = name[len(prefix) :].lower().split("__")[0]
            if field not in known:
                close = difflib.get_close_matches(field, known, n=1)
                hint = f"; did you mean {prefix}{close[0].upper()}?" if close else ""
                raise InvalidArgument(
                    f"environment variable {name} is no setting of this process{hint} "
                    f"(settings: {', '.join(sorted(known))})"
                )

    def describe(self) -> str:
        """One `name = value` line per setting, secrets masked: printed at start-up."""
        lines = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, BaseModel):
                for sub in type(value).model_fields:
                    lines.append(f"  {name}.{sub} = {self.shown(sub, getattr(value, sub))}")
            else:
                lines.append(f"  {name} = {self.shown(name, value)}")
        return "\n".join(lines)

    def shown(self, name: str, value: Any) -> str:
        """How one setting is printed; subclasses may override for a field of theirs."""
        if isinstance(value, SecretStr):
            return "********"
        if isinstance(value, list) and value and isinstance(value[0], SecretStr):
            return f"[{len(value)} secret(s), masked]"
        if isinstance(value, Path):
            return os.fspath(value)
        return repr(value)


def describe_validation(err: ValidationError, cls: type[BaseModel], config: Path | None) -> str:
    """A pydantic error as one line a user can act on, naming the setting and its source."""
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "settings"
        if e["type"] == "extra_forbidden":
            known = ", ".join(sorted(cls.model_fields))
            source = f" in {config}" if config else ""
            problems.append(f"unknown setting {where!r}{source} (settings: {known})")
        else:
            problems.append(f"{where}: {e['msg']}")
    return "invalid settings: " + "; ".join(problems)
