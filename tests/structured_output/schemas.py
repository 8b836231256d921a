"""Twenty JSON schemas of varied shape for the end-to-end checks: nested objects, arrays,
enums, bounded numbers, required and optional fields. Strings and arrays are bounded so that a
small model sampled at temperature 1 finishes well inside max_tokens."""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 16}
WORD = {"type": "string", "maxLength": 12}


def obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, **extra}


SCHEMAS: list[dict] = [
    obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"city": NAME, "population": {"type": "integer", "minimum": 1, "maximum": 40000000},
         "capital": {"type": "boolean"}}),
    obj({"color": {"type": "string", "enum": ["red", "green", "blue"]},
         "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    obj({"temperature": {"type": "number", "minimum": -50, "maximum": 60},
         "unit": {"enum": ["C", "F"]}}),
    obj({"tags": {"type": "array", "items": WORD, "minItems": 1, "maxItems": 4}}),
    obj({"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                    "maxItems": 5}}),
    obj({"user": obj({"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "name": NAME}),
         "active": {"type": "boolean"}}),
    obj({"title": NAME, "subtitle": WORD, "pages": {"type": "integer", "minimum": 1,
                                                    "maximum": 2000}}, required=["title"]),
    obj({"point": obj({"x": {"type": "number", "minimum": -1000, "maximum": 1000},
                       "y": {"type": "number", "minimum": -1000, "maximum": 1000}})}),
    obj({"items": {"type": "array", "maxItems": 3,
                   "items": obj({"sku": WORD, "qty": {"type": "integer", "minimum": 1,
                                                      "maximum": 9}})}}),
    obj({"status": {"enum": ["ok", "error", "pending"]},
         "code": {"type": "integer", "enum": [200, 404, 500]}}),
    obj({"answer": {"type": "boolean"}, "confidence": {"type": "number", "minimum": 0,
                                                       "maximum": 1}}),
    obj({"matrix": {"type": "array", "maxItems": 3,
                    "items": {"type": "array", "maxItems": 3,
                              "items": {"type": "integer", "minimum": -9, "maximum": 9}}}}),
    obj({"name": NAME, "nickname": {"anyOf": [WORD, {"type": "null"}]}}),
    obj({"a": obj({"b": obj({"c": obj({"d": {"type": "integer", "minimum": 0,
                                               "maximum": 10}})})})}),
    obj({"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
         "currency": {"enum": ["USD", "EUR", "JPY"]}, "discount": {"type": "boolean"}},
        required=["price", "currency"]),
    obj({"event": NAME, "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
         "attendees": {"type": "integer", "minimum": 0, "maximum": 500}}),
    {"type": "array", "items": obj({"k": WORD, "v": {"type": "integer", "minimum": 0,
                                                     "maximum": 99}}),
     "minItems": 1, "maxItems": 3},
    obj({"ok": {"const": True}, "message": WORD, "retries": {"type": "integer", "minimum": 0,
                                                              "maximum": 5}},
        required=["ok"]),
    obj({"person": obj({"first": NAME, "last": NAME}),
         "languages": {"type": "array", "items": {"enum": ["en", "fr", "de", "ja"]},
                       "uniqueItems": False, "maxItems": 4},
         "age": {"type": "integer", "minimum": 18, "maximum": 99}},
        required=["person", "age"]),
]
