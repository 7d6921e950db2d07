"""The protocol version every hello carries.

Bump it when a message changes incompatibly. Appending a field with a default
is compatible and needs no bump (msgspec ignores unknown fields and fills
missing defaulted ones).
"""

PROTOCOL_VERSION = 3
