"""Each environment variable declared once: name, default, parser, secret or not, and the
reference's text. A settings class lists its fields with these declarations; reading them,
the redacted view and the reference table all come from that one list. The Redis variables,
which the sidecar and the scaler both read, are declared here."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"
_KEY = "setting"
_NESTED = "settings"


class Invalid(ValueError):
    """A parser's refusal: the form it expects, and what is wrong where that needs saying
    (always for a secret, whose value is never echoed)."""

    def __init__(self, expected: str, wrong: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.wrong = wrong


@dataclass(frozen=True, slots=True)
class Setting:
    """One environment variable. `parse` turns its text into the field's value or raises
    Invalid; without one the loader reads it in code (it needs other settings: the pools,
    the routes). A blank variable counts as unset."""

    name: str
    default: str | None
    doc: str  # the reference's text for it
    parse: Callable[[str], Any] | None = None
    secret: bool = False  # never printed: `<redacted>` when set
    normalize: Callable[[str], str] | None = None  # before parsing; also what messages echo
    redact: Callable[[str], str] | None = None  # hides a secret part (a URL's password)
    show: Callable[[Any], Any] | None = None  # the parsed value → the redacted view's JSON
    when_unset: Any = None  # the value when unset and without a default
    unset: str = "—"  # the reference's default cell when there is no default

    def field(self, **kwargs: Any) -> Any:
        """The dataclass field carrying this declaration (typed Any so a class body reads
        `redis_url: str | None = REDIS_URL.field()`)."""
        # repr() shows no secret either: not a secret's value, nor a URL that may hold one.
        return field(metadata={_KEY: self}, repr=not self.secret and self.redact is None,
                     **kwargs)

    def refusal(self, text: str, invalid: Invalid) -> str:
        """The problem line: the variable, its value (unless secret) and the expected form."""
        wrong = f"{invalid.wrong}; " if invalid.wrong else ""
        if self.secret:
            return f"{self.name} is set but {invalid.wrong or 'is not valid'}: expected " \
                   f"{invalid.expected}"
        shown = self.redact(text) if self.redact else text
        return f"{self.name}={shown!r}: {wrong}expected {invalid.expected}"

    def view(self, value: Any) -> Any:
        """The value as `check` and `/stats` print it: secrets and URL passwords hidden."""
        if self.secret:
            return REDACTED if value is not None else None
        shown = self.show(value) if self.show else value
        return self.redact(shown) if self.redact and isinstance(shown, str) else shown

    def reference_row(self) -> str:
        default = f"`{self.default}`" if self.default is not None else self.unset
        return f"| `{self.name}` | {default} | {self.doc} |"


def setting(name: str, default: str | None, doc: str, *, init_default: Any = MISSING,
            **kwargs: Any) -> Any:
    """Declare a variable in a settings class body:
    `listen: Listen = setting("SIDECAR_LISTEN", "127.0.0.1:7878", "...", parse=...)`;
    `init_default` is the field's default for code that builds the class itself."""
    if init_default is MISSING:
        return Setting(name, default, doc, **kwargs).field()
    return Setting(name, default, doc, **kwargs).field(default=init_default)


def nested(cls: type) -> Any:
    """A field holding another settings class (the scaler's NomadAccess): its variables are
    the owner's too, in `declared` and `redacted`; the loader reads it."""
    return field(metadata={_NESTED: cls})


def declared(cls: type) -> dict[str, Setting]:
    """The class's declarations by variable name, in field order, nested ones included."""
    found: dict[str, Setting] = {}
    for f in fields(cls):
        if _KEY in f.metadata:
            found[f.metadata[_KEY].name] = f.metadata[_KEY]
        elif _NESTED in f.metadata:
            found.update(declared(f.metadata[_NESTED]))
    return found


def _declared_fields(cls: type) -> Iterator[tuple[Field[Any], Setting]]:
    for f in fields(cls):
        if _KEY in f.metadata:
            yield f, f.metadata[_KEY]


class Reader:
    """Reads declared variables from an environment, collecting problems instead of raising,
    so one run names everything to fix."""

    def __init__(self, env: Mapping[str, str], settings: Mapping[str, Setting]) -> None:
        self.env = env
        self.settings = settings
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or self.settings[name].default

    def problem(self, name: str, value: object, expected: str) -> None:
        self.problems.append(f"{name}={value!r}: expected {expected}")

    def read(self, name: str) -> Any:
        """The parsed value; when refused, the problem is noted and the default stands in."""
        s = self.settings[name]
        raw = self.raw(name)
        if raw is None or s.parse is None:
            return s.when_unset if raw is None else raw
        text = s.normalize(raw) if s.normalize else raw
        try:
            return s.parse(text)
        except Invalid as refused:
            self.problems.append(s.refusal(text, refused))
        if s.default is None:
            return s.when_unset
        return s.parse(s.normalize(s.default) if s.normalize else s.default)

    def fields_of(self, cls: type) -> dict[str, Any]:
        """Every field of `cls` whose declaration has a parser, by attribute name, read in
        declaration order; the others are the loader's to give."""
        return {f.name: self.read(s.name) for f, s in _declared_fields(cls) if s.parse}


def redacted(obj: Any) -> dict[str, Any]:
    """A settings object as `check` prints it: each declared variable by name, secrets
    hidden (nested settings objects inlined)."""
    view: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if _KEY in f.metadata:
            view[f.metadata[_KEY].name] = f.metadata[_KEY].view(value)
        elif _NESTED in f.metadata:
            view.update(redacted(value))
    return view


# ---- parsers shared by the sidecar and the scaler: each raises Invalid with the form it wants


def number(*, minimum: float = 0, strict: bool = True, integer: bool = False,
           finite: bool = False, maximum: float | None = None) -> Callable[[str], float]:
    kind = "an integer" if integer else "a finite number" if finite else "a number"
    bound = f"{'>' if strict else '>='} {minimum:g}"
    if maximum is not None:
        bound += f" and <= {maximum:g}"

    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise Invalid(f"{kind} {bound}") from None
        if math.isnan(value) or (value <= minimum if strict else value < minimum) \
                or (maximum is not None and value > maximum) \
                or (finite and math.isinf(value)):
            raise Invalid(f"{kind} {bound}")
        return value

    return parse


def one_of(*choices: str, expected: str | None = None) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise Invalid(expected or f"one of {', '.join(choices)}")
        return text

    return parse


def flag(text: str) -> bool:
    """`1`, `true`, `yes`, `on` (any case) is on; anything else is off, never refused."""
    return text.strip().lower() in ("1", "true", "yes", "on")


def ca_file(text: str) -> str:
    if not os.path.isfile(text):
        raise Invalid("a readable PEM file of CA certificates")
    return text


def redis_url(text: str) -> str:
    if urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise Invalid("a redis://, rediss:// or unix:// URL")
    return text


def redact_url(url: str) -> str:
    """Hide the password (and a user that may be a token) of a URL, in its userinfo or its
    query (`?password=`). Hosts are not parsed: a Sentinel URL lists several
    (`redis://:pw@h1:26379,h2:26380/0`), which no URL parser reads as one port."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = (f"{user}:{REDACTED}@" if colon else f"{REDACTED}@") + hosts
    query = parts.query
    if query:
        query = "&".join(
            f"{name}={REDACTED}" if name.lower() in SECRET_QUERY_NAMES else item
            for item in query.split("&")
            for name in [item.partition("=")[0]])
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


SECRET_QUERY_NAMES = frozenset({"password", "username", "token", "api_key", "apikey"})


# ---- read by the sidecar and the scaler alike (one declaration, one meaning)

REDIS_MODES = ("standalone", "cluster", "sentinel")

REDIS_URL = Setting(
    "SIDECAR_REDIS_URL", None, "`redis://`, `rediss://` (TLS) or `unix://`",
    parse=redis_url, redact=redact_url, unset="unset = embedded in-memory store")
REDIS_MODE = Setting(
    "SIDECAR_REDIS_MODE", "standalone",
    "`standalone`, `cluster` (URL names any node) or `sentinel` (URL host list names the "
    "sentinels)", parse=one_of(*REDIS_MODES))
REDIS_SENTINEL_MASTER = Setting(
    "SIDECAR_REDIS_SENTINEL_MASTER", None, "Sentinel service name (sentinel mode)",
    parse=str)
REDIS_CA_FILE = Setting(
    "SIDECAR_REDIS_CA_FILE", None,
    "PEM bundle to verify a `rediss://` server with (certificate and host name are always "
    "verified)", parse=ca_file, unset="system CAs")


def redis_problems(values: Mapping[str, Any]) -> list[str]:
    """The rules between the Redis variables, each valid alone, for every reader of them
    (`values`: the settings' redis_url, redis_mode, redis_sentinel_master, redis_ca_file)."""
    problems = []
    if values["redis_mode"] == "sentinel" and not values["redis_sentinel_master"]:
        problems.append("SIDECAR_REDIS_SENTINEL_MASTER is not set: expected the Sentinel "
                        "service name (e.g. mymaster) when SIDECAR_REDIS_MODE=sentinel")
    if values["redis_ca_file"] is not None \
            and not (values["redis_url"] or "").startswith("rediss://"):
        problems.append("SIDECAR_REDIS_CA_FILE is set but SIDECAR_REDIS_URL is not a "
                        "rediss:// URL: expected rediss://host:port when Redis speaks TLS")
    return problems
