"""Request bodies: decoded once, strictly, by msgspec, and documented in the OpenAPI schema as their struct.

Every request body is a `Command` (schemas.py). A handler declares it as `data: JSONBody[HoldCommand]`; the
`StrictBodies` plugin, registered on the app, gives every such parameter the `StrictBody` DTO, so Litestar hands
the raw bytes to `StrictBody.decode_bytes` and passes the command on untouched. Without it, Litestar would decode
the body leniently ("50" becomes 50, "true" becomes True, and a JSON number becomes a binary float before it
becomes a Decimal); strict decoding refuses wrong types outright and turns JSON numbers into Decimals digit for
digit, so no ratio ever passes through a float. Litestar's DTO machinery (field definitions, transfer models,
generated code) is not used: the struct is the wire format, and the schema documents it as Litestar documents a
plain `data: T` parameter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.dto import AbstractDTO
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.plugins import OpenAPISchemaPlugin, SerializationPlugin
from litestar.typing import FieldDefinition

from ledger_service.domain import errors
from ledger_service.observability import bind_request_id
from ledger_service.schemas import RATIO_PATTERN, Command

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.dto.data_structures import DTOFieldDefinition
    from litestar.openapi.spec import Reference

T = TypeVar("T")

_JSON_WHITESPACE = b" \t\r\n"
"""RFC 8259's whitespace: bytes.strip() with no argument would also take a form feed or a vertical tab."""

_UNTYPED = msgspec.json.Decoder(float_hook=str)
"""Any valid JSON as builtins; numbers as strings or ints, so none is out of range."""


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate(pairs: list[tuple[str, Any]]) -> None:
    if len({key for key, _ in pairs}) != len(pairs):
        raise _DuplicateKey
    # The decoded value is not needed: None keeps the exact check as cheap as it can be.


def has_duplicate_keys(body: bytes) -> bool:
    """Whether an object in `body`, valid JSON, names a key twice. msgspec keeps the last value; a proxy or a
    signer in front of the service may take the first, so such a body means two things and is refused.

    Every key is followed by a colon, and no colon outside a string is anything else. Decoded, an object holds
    each key once; encoded again, it writes each once, and every string as it was. So the body repeats a key
    exactly when it has more colons than its re-encoding: two passes in C, no walk in Python. A `\\u` escape
    could write a colon (`\\u003a`) that the raw count misses, so such a body gets an exact check instead
    (stdlib json, slower; escapes are rare in these bodies).
    """
    if b"\\u" in body:
        try:
            json.loads(body, object_pairs_hook=_refuse_duplicate, parse_int=str, parse_float=str, parse_constant=str)
        except _DuplicateKey:
            return True
        return False
    return body.count(b":") > msgspec.json.encode(_UNTYPED.decode(body)).count(b":")


_JSON_NUMBER = re.compile(RATIO_PATTERN)


def check_number_strings(body: bytes, command: Command) -> None:
    """Refuse a decimal field sent as a string that is not in JSON's number syntax. msgspec reads such a string
    with Python's Decimal(), which also takes `2_5` (25), other scripts' digits and surrounding spaces."""
    fields = _UNTYPED.decode(body)  # an object: the command decoded from it
    for name in command.number_strings:
        value = fields.get(name)
        if isinstance(value, str) and not _JSON_NUMBER.match(value):
            raise errors.ValidationFailed(f'{name} must be a JSON number, or a string holding one such as "2.5"')


class StrictBody(AbstractDTO[T]):
    """The body of a request as the struct `T`, decoded strictly (400 `validation_error` otherwise). A body
    with a `request_id` binds it to the log lines of the call (observability.py)."""

    __slots__ = ()

    def decode_bytes(self, value: bytes) -> Any:
        if not value.strip(_JSON_WHITESPACE):
            # An empty body never gets here (Litestar passes it on as no body: the parameter's default, or a 400
            # if it has none). JSON's whitespace alone is no body either; other bytes (a form feed, say) go on to
            # the decoder, which refuses them.
            handler = self.asgi_connection.route_handler
            if handler.parsed_data_field is not None and handler.parsed_data_field.is_optional:
                return None
            raise errors.ValidationFailed("the request needs a JSON body")
        try:
            command = msgspec.json.decode(value, type=self.model_type, strict=True)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            raise errors.ValidationFailed(str(error)) from None
        except UnicodeDecodeError:  # msgspec raises it, not a DecodeError, for a string that is not UTF-8
            raise errors.ValidationFailed("the JSON body is not valid UTF-8") from None
        if has_duplicate_keys(value):
            raise errors.ValidationFailed("the JSON body names a key twice in one object")
        if isinstance(command, Command) and command.number_strings:  # the pricing bodies only: off the hot path
            check_number_strings(value, command)
        request_id = getattr(command, "request_id", None)
        if isinstance(request_id, str):
            bind_request_id(request_id)
        return command

    def decode_builtins(self, value: dict[str, Any]) -> Any:
        # Only form bodies are decoded from builtins; the admission hook refuses non-JSON bodies before this.
        raise errors.UnsupportedMediaType("send the body as JSON with Content-Type: application/json")

    @classmethod
    def create_for_field_definition(
        cls, field_definition: FieldDefinition, handler_id: str, backend_cls: Any = None
    ) -> None:
        """Nothing to prepare: decode_bytes needs no DTO backend."""

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: SchemaCreator
    ) -> Reference | Schema:
        # The command alone, not `command | null`: an optional body (a refund's) may be left out, but `null` is no
        # command, and the decoder refuses it.
        command = next(
            (
                candidate.annotation
                for candidate in (field_definition, *field_definition.inner_types)
                if candidate.is_subclass_of(Command)
            ),
            field_definition.annotation,
        )
        return schema_creator.for_field_definition(
            FieldDefinition.from_annotation(command, kwarg_definition=field_definition.kwarg_definition)
        )

    @classmethod
    def generate_field_definitions(cls, model_type: type[Any]) -> Generator[DTOFieldDefinition, None, None]:
        yield from ()  # only DTO backends ask for these, and StrictBody builds none

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False


class StrictBodies(SerializationPlugin):
    """Gives every `data` parameter typed as a Command (or an optional one) the StrictBody DTO. Responses are
    Views, never Commands, so they keep Litestar's own encoding."""

    def supports_type(self, field_definition: FieldDefinition) -> bool:
        return field_definition.is_subclass_of(Command)

    def create_dto_for_type(self, field_definition: FieldDefinition) -> type[AbstractDTO[Any]]:
        command = next(
            candidate.annotation
            for candidate in (field_definition, *field_definition.inner_types)
            if candidate.is_subclass_of(Command)
        )
        return StrictBody[command]  # type: ignore[valid-type]


_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})|\\u([0-9a-fA-F]{4})|\\U([0-9a-fA-F]{8})")


def openapi_pattern(pattern: str) -> str:
    """A msgspec pattern (Python syntax, `\\A...\\Z`) as the OpenAPI document states it (ECMA-262, which JSON
    Schema and the generated clients read): `^...$`, which anchor the whole value there, and `\\xNN`, `\\uNNNN`,
    `\\UNNNNNNNN` escapes written as the characters themselves (ECMA-262 has no `\\U`)."""
    if not (pattern.startswith("\\A") and pattern.endswith("\\Z")):
        raise ValueError(f"a body pattern must be anchored with \\A and \\Z: {pattern}")
    body = _ESCAPE.sub(lambda match: chr(int(next(group for group in match.groups() if group), 16)), pattern[2:-2])
    return f"^{body}$"


RATIO_STRING_OPENAPI_PATTERN = r"^(?:(?:0|[1-9][0-9]{0,8})(?:\.[0-9]{1,21})?|1000000000)$"
"""What the OpenAPI document states for a ratio as a string: a subset of what check_ratio takes (no exponent, at most
9 integer and 21 decimal digits, 30 in all; or 10^9), simple enough for every client's pattern engine."""
RATIO_OPENAPI = (Schema(type=OpenAPIType.STRING, pattern=RATIO_STRING_OPENAPI_PATTERN),)
"""A ratio in the OpenAPI document: a string as above. The API also takes a JSON number, but JSON Schema cannot
bound a number's decimal places (`1e-31` is in 0..10^9 and refused: more than 30 decimal places), and a client
that holds ratios as binary floats would not send them exactly; so the document states the string form, as it did
before (and as responses give ratios)."""


class CommandSchemas(OpenAPISchemaPlugin):
    """The OpenAPI schema of a Command: what Litestar generates for a struct, made as strict as the decoder.

    Unknown fields are refused (`additionalProperties: false`); integer bounds are the struct's own, as integers
    (Litestar drops a bound of 0 and writes 2^63-1 as a float, which rounds above it); a ratio is a string in
    the ratio syntax (RATIO_OPENAPI); and a command's cross-field rules (`__post_init__`) are stated by
    its `openapi_rules`, JSON Schema keywords added to the struct's schema."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        return not field_definition.is_union and field_definition.is_subclass_of(Command)

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: SchemaCreator) -> Schema:
        schema = StructSchemaPlugin().to_openapi_schema(field_definition, schema_creator)
        schema.additional_properties = False
        command: type[Command] = field_definition.type_
        properties = schema.properties or {}
        info = msgspec.inspect.type_info(command)
        assert isinstance(info, msgspec.inspect.StructType)
        for field in info.fields:
            prop = properties.get(field.encode_name)
            if not isinstance(prop, Schema):
                continue
            kinds = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else (field.type,)
            nullable = any(isinstance(kind, msgspec.inspect.NoneType) for kind in kinds)
            for kind in kinds:
                inner = kind.type if isinstance(kind, msgspec.inspect.Metadata) else kind
                if isinstance(inner, msgspec.inspect.IntType):
                    prop.minimum = inner.ge
                    prop.maximum = inner.le
                elif isinstance(inner, msgspec.inspect.StrType) and inner.pattern is not None:
                    prop.pattern = openapi_pattern(inner.pattern)
                elif isinstance(inner, msgspec.inspect.DecimalType):
                    prop.one_of = [*RATIO_OPENAPI, Schema(type=OpenAPIType.NULL)] if nullable else None
                    prop.type = None if nullable else OpenAPIType.STRING
                    prop.pattern = None if nullable else RATIO_STRING_OPENAPI_PATTERN
        aliases = schema.field_aliases()
        for keyword, value in command.openapi_rules.items():
            setattr(schema, aliases.get(keyword, keyword), value)
        return schema
