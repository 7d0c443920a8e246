"""The OpenAPI document shipped in this package: what clients read and what requests are checked against."""

from __future__ import annotations

import copy
import json
import math
import re
from datetime import datetime, timezone
from functools import cache, lru_cache
from importlib import resources
from typing import Any, Dict, Iterator, Tuple

from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError

from pg_backup_api.core.errors import InvalidRequest
from pg_backup_api.rules import paths, ssh_command


class StringFormatChecker(FormatChecker):
    """Formats describe strings: any other instance conforms, and the `type` keyword refuses it.

    jsonschema runs format checks on every instance whatever its type, and a check that
    assumes a string would raise something other than its declared error: a 500.
    """

    def check(self, instance: Any, format: str) -> None:
        if isinstance(instance, str):
            super().check(instance, format)


# Formats whose rules a regular expression cannot say; the checks raise InvalidRequest
# with a message that names the field and the offending part.
FORMATS = StringFormatChecker(formats=())
# Syntax and the never-allowed ssh options only: the server's own ssh policy is applied by the service.
FORMATS.checks("ssh-command", raises=InvalidRequest)(lambda v: ssh_command.check_format(v) is not None)
FORMATS.checks("target-path", raises=InvalidRequest)(
    lambda v: paths.check_target_path("path", v) is None)
FORMATS.checks("offset-date-time", raises=InvalidRequest)(lambda v: parse_offset_time("path", v) is not None)

OFFSET_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})")


def parse_offset_time(field: str, value: Any) -> datetime:
    """An ISO-8601 time with an explicit offset: without one, Barman would guess the time zone."""
    if not isinstance(value, str) or not OFFSET_TIME.fullmatch(value):
        raise InvalidRequest(f"field '{field}' must be an ISO-8601 time with an explicit offset, "
                             f"such as 2026-11-27T09:30:00+00:00; got {_shown(value)}")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # 0001-01-01T00:00:00+01:00 is before year 1 in UTC: comparing it would overflow later.
        moment.astimezone(timezone.utc)
    except (ValueError, OverflowError) as exc:
        raise InvalidRequest(f"field '{field}' is not a valid time: {exc}") from None
    return moment


@lru_cache(maxsize=1)
def document() -> Dict[str, Any]:
    return json.loads(resources.files("pg_backup_api.rules").joinpath("openapi.json").read_text())


@lru_cache(maxsize=4)
def host_document(barman_version: str, refusals: Tuple[Tuple[str, str], ...]) -> Dict[str, Any]:
    """The shipped document as a host with *barman_version* serves it: `info.x-barman-version`, and each
    part marked `x-barman-requires` a feature of *refusals* (feature, why it is refused) says so."""
    found = copy.deepcopy(document())
    found["info"]["x-barman-version"] = barman_version
    refused = dict(refusals)

    def mark(node: Any) -> None:
        if isinstance(node, dict):
            notes = [refused[k] for k in node.get("x-barman-requires", {}) if k in refused]
            if notes:
                node["description"] = " ".join([node.get("description", ""), "Not on this host:",
                                                "; ".join(notes) + "."]).strip()
            for value in node.values():
                mark(value)
        elif isinstance(node, list):
            for value in node:
                mark(value)

    mark(found)
    return found


@cache
def _ecma_regex(pattern: str) -> "re.Pattern[str]":
    # In JSON Schema (ECMA-262) `$` ends the string; in Python it also matches before a final
    # newline, which would let "latest\n" through a `^...$` pattern.
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$")
                      else pattern)


def _pattern(validator: Any, pattern: str, instance: Any,
             schema: Dict[str, Any]) -> Iterator[ValidationError]:
    if isinstance(instance, str) and not _ecma_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _is_integer(checker: Any, instance: Any) -> bool:
    # JSON Schema counts 1.0 as an integer; Barman's options would get "1.0".
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_number(checker: Any, instance: Any) -> bool:
    # Python's json reads NaN, Infinity and 1e400 (as inf): none is a JSON number.
    return _is_integer(checker, instance) or (isinstance(instance, float) and math.isfinite(instance))


_Validator = validators.extend(
    Draft202012Validator, {"pattern": _pattern},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine_many({"integer": _is_integer, "number": _is_number}))


@cache
def _validator(name: str) -> Any:
    # The components travel with the root schema so that its `#/components/...` refs resolve.
    root = {"$ref": f"#/components/schemas/{name}", "components": document()["components"]}
    return _Validator(root, format_checker=FORMATS)


def validate(name: str, instance: Any) -> None:
    """Raise InvalidRequest naming the first field of *instance* that breaks schema *name*."""
    # Paths mix keys and indexes: compared as text, never an int against a str.
    errors = sorted(_validator(name).iter_errors(instance),
                    key=lambda e: (len(e.path), [str(p) for p in e.path]))
    if errors:
        raise InvalidRequest(_message(errors[0]))


def _message(error: ValidationError) -> str:
    field = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "format" and isinstance(error.cause, InvalidRequest):
        return error.cause.message.replace("field 'path'", f"field '{field}'")
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f"field '{field}.{missing}' is required" if field else f"field '{missing}' is required"
    if error.validator == "additionalProperties":
        allowed = set(error.schema.get("properties", {}))
        unknown = sorted(k for k in error.instance if k not in allowed)
        where = f" in '{field}'" if field else ""
        return f"unknown field(s){where}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
    if error.validator == "type":
        kinds = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        named = kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
        return f"field '{field}' must be of type {named}"
    if error.validator in ("pattern", "minLength", "maxLength", "const", "enum", "oneOf"):
        description = error.schema.get("description")
        detail = description if error.validator in ("pattern", "oneOf") and description else error.message
        return f"field '{field}' is invalid: {_clipped(detail)}"
    return f"field '{field}' is invalid: {_clipped(error.message)}" if field else _clipped(error.message)


MAX_SHOWN = 200


def _clipped(text: str) -> str:
    """Messages quote the value; a 60 KiB value need not come back whole."""
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def _shown(value: Any) -> str:
    return _clipped(repr(value))
