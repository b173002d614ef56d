from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetValueRequest(_message.Message):
    __slots__ = ("plugin_id", "key")
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    plugin_id: str
    key: str
    def __init__(self, plugin_id: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class GetValueResponse(_message.Message):
    __slots__ = ("found", "value")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    found: bool
    value: str
    def __init__(self, found: bool = ..., value: _Optional[str] = ...) -> None: ...

class SetValueRequest(_message.Message):
    __slots__ = ("plugin_id", "key", "value")
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    plugin_id: str
    key: str
    value: str
    def __init__(self, plugin_id: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class SetValueResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteValueRequest(_message.Message):
    __slots__ = ("plugin_id", "key")
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    plugin_id: str
    key: str
    def __init__(self, plugin_id: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class DeleteValueResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: bool = ...) -> None: ...
