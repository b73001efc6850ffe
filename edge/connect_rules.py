"""MQTT 3.1.1 string rules for a CONNECT that amqtt does not enforce.

amqtt decodes a string that is not valid UTF-8 to the ``repr`` of its bytes
(``"b'\\xff'"``) and carries on, so a device could connect under that made-up client id
(or user name). MQTT 3.1.1 says a server receiving ill-formed UTF-8 closes the connection
[MQTT-1.5.3-1] and may close it for U+0000 [MQTT-1.5.3-2]; the edge broker does both, for
the client id, the will topic (which must also be a topic name, no wildcards) and the user
name. The rest of the CONNECT (structure, protocol level, empty client id with
clean_session=0 -> CONNACK 2, [MQTT-3.1.3-8]) is left to amqtt, which handles it.

Pure: :func:`connect_string_error` takes the CONNECT body bytes.
"""

from __future__ import annotations

__all__ = ["connect_string_error"]

_WILL_FLAG = 0x04
_PASSWORD_FLAG = 0x40
_USERNAME_FLAG = 0x80


def _string(body: bytes, offset: int) -> tuple[bytes, int] | None:
    if offset + 2 > len(body):
        return None
    end = offset + 2 + ((body[offset] << 8) | body[offset + 1])
    if end > len(body):
        return None
    return body[offset + 2 : end], end


def _text_error(name: str, raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"[MQTT-1.5.3-1] {name} is not valid UTF-8"
    if "\x00" in text:
        return f"[MQTT-1.5.3-2] {name} contains U+0000"
    return None


def connect_string_error(body: bytes) -> str | None:
    """Why this CONNECT body must be refused for its strings, or None (also None when the
    structure itself is broken: amqtt refuses that)."""
    name = _string(body, 0)
    if name is None or name[1] + 4 > len(body):
        return None
    flags = body[name[1] + 1]
    fields = [("client id", True)]
    if flags & _WILL_FLAG:
        fields += [("will topic", True), ("will message", False)]
    if flags & _USERNAME_FLAG:
        fields.append(("user name", True))
    if flags & _PASSWORD_FLAG:
        fields.append(("password", False))  # binary data, any bytes
    offset = name[1] + 4
    for field, is_text in fields:
        parsed = _string(body, offset)
        if parsed is None:
            return None
        raw, offset = parsed
        if not is_text:
            continue
        error = _text_error(field, raw)
        if error is not None:
            return error
        if field == "will topic" and (b"+" in raw or b"#" in raw):
            return "[MQTT-3.1.2-14] will topic contains a wildcard"
    return None
