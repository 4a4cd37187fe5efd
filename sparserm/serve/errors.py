"""The one error type and the one error body of every sparserm HTTP app.

Every error a service sends (400, 401, 404, 405, 413, 422, 500) has the body :class:`ErrorBody`:
``{"detail": message, "field": dotted path or null, "errors": [{"field", "msg", "type"}, ...]}``. ``errors`` lists
every schema error of a request that failed validation and is empty otherwise. :class:`ServeRequestError` is the
same error in Python: the server raises it, the HTTP guard renders it, and the clients raise it again from a 4xx
answer (``DeploymentHandle`` callers get it pickled). Only pydantic here, so clients import it without a web stack.
"""
from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorItem(BaseModel):
    field: str = Field(description="dotted path of the value, as in ErrorBody.field")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. missing, string_type, json_invalid")


class ErrorBody(BaseModel):
    """The body of every error answer."""

    detail: str = Field(description="what is wrong")
    field: str | None = Field(default=None, description="dotted path of the offending value (items.3.response), "
                                                        "'body' for the body as a whole, 'Authorization' for the "
                                                        "token; null when no request field is at fault")
    errors: list[ErrorItem] = Field(default_factory=list, description="every schema error (400 and 422 from "
                                                                      "validation); empty otherwise")


class ServeRequestError(ValueError):
    """A bad request: ``status`` (4xx), a message, the offending field (dotted path, e.g. ``items.3.response``) and,
    from validation, every schema error."""

    def __init__(self, status: int, message: str, field: str | None = None, errors: list[dict] | None = None):
        super().__init__(f"{status} {message}" + (f" (field {field})" if field else ""))
        self.status, self.message, self.field, self.errors = status, message, field, list(errors or [])

    def __reduce__(self):  # picklable across Ray (handle callers get the same error)
        return (ServeRequestError, (self.status, self.message, self.field, self.errors))

    def body(self) -> dict:
        return ErrorBody(detail=self.message, field=self.field, errors=self.errors).model_dump()


def error_field(loc: tuple | list) -> str:
    """``("body", "items", 0, "prompt", "str")`` -> ``"items.0.prompt"`` (drops the body marker and union tags)."""
    parts = [str(p) for p in loc if p != "body"]
    parts = [p for p in parts if p not in ("str", "list[ChatMessage]", "list[str]") and not p.startswith("function-")]
    return ".".join(parts) or "body"


def validation_error(errors: list[dict]) -> ServeRequestError:
    """pydantic's (or FastAPI's) error list as one :class:`ServeRequestError`: 400 when the body is not JSON, else
    422 naming the deepest field (a union's last branch often goes deepest, and names the field best)."""
    items = [{"field": "body" if e.get("type") == "json_invalid" else error_field(e.get("loc", ())),  # loc: offset
              "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors]
    if any(e["type"] == "json_invalid" for e in items):
        return ServeRequestError(400, "invalid JSON body", "body", items)
    first = max(items, key=lambda e: len(e["field"].split(".")), default={"field": "body", "msg": "invalid request"})
    return ServeRequestError(422, f"{first['field']}: {first['msg']}", first["field"], items)
