"""The OpenAPI document shipped in this package: what clients read and what requests are checked against."""

from __future__ import annotations

import json
from functools import cache, lru_cache
from importlib import resources
from typing import Any, Dict

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from pg_backup_api.errors import InvalidRequest


@lru_cache(maxsize=1)
def document() -> Dict[str, Any]:
    return json.loads(resources.files("pg_backup_api").joinpath("openapi.json").read_text())


@cache
def _validator(name: str) -> Draft202012Validator:
    # The components travel with the root schema so that its `#/components/...` refs resolve.
    root = {"$ref": f"#/components/schemas/{name}", "components": document()["components"]}
    return Draft202012Validator(root)


def validate(name: str, instance: Any) -> None:
    """Raise InvalidRequest naming the first field of *instance* that breaks schema *name*."""
    errors = sorted(_validator(name).iter_errors(instance), key=lambda e: (len(e.path), e.path))
    if errors:
        raise InvalidRequest(_message(errors[0]))


def _message(error: ValidationError) -> str:
    field = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f"field '{missing}' is required"
    if error.validator == "additionalProperties":
        allowed = set(error.schema.get("properties", {}))
        unknown = sorted(k for k in error.instance if k not in allowed)
        return f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
    if error.validator == "type":
        return f"field '{field}' must be of type {error.validator_value}"
    if error.validator in ("pattern", "minLength", "maxLength", "const", "enum"):
        description = error.schema.get("description")
        detail = description if error.validator == "pattern" and description else error.message
        return f"field '{field}' is invalid: {detail}"
    return f"field '{field}' is invalid: {error.message}" if field else error.message
