import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from toru.v1 import plugin_pb2 as _plugin_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_STATE_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_HEALTH_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_PLUGIN_ADDED: _ClassVar[EventKind]
    EVENT_KIND_PLUGIN_REMOVED: _ClassVar[EventKind]
    EVENT_KIND_PLUGIN_SKIPPED: _ClassVar[EventKind]
    EVENT_KIND_PLUGIN_UPDATED: _ClassVar[EventKind]
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_STATE_CHANGED: EventKind
EVENT_KIND_HEALTH_CHANGED: EventKind
EVENT_KIND_PLUGIN_ADDED: EventKind
EVENT_KIND_PLUGIN_REMOVED: EventKind
EVENT_KIND_PLUGIN_SKIPPED: EventKind
EVENT_KIND_PLUGIN_UPDATED: EventKind

class Event(_message.Message):
    __slots__ = ("seq", "plugin_id", "time", "kind", "from_state", "to_state", "reason", "details", "exit", "next_restart_at", "healthy")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    NEXT_RESTART_AT_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    seq: int
    plugin_id: str
    time: _timestamp_pb2.Timestamp
    kind: EventKind
    from_state: _plugin_pb2.PluginState
    to_state: _plugin_pb2.PluginState
    reason: str
    details: _containers.ScalarMap[str, str]
    exit: _plugin_pb2.ExitInfo
    next_restart_at: _timestamp_pb2.Timestamp
    healthy: bool
    def __init__(self, seq: _Optional[int] = ..., plugin_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[_Union[EventKind, str]] = ..., from_state: _Optional[_Union[_plugin_pb2.PluginState, str]] = ..., to_state: _Optional[_Union[_plugin_pb2.PluginState, str]] = ..., reason: _Optional[str] = ..., details: _Optional[_Mapping[str, str]] = ..., exit: _Optional[_Union[_plugin_pb2.ExitInfo, _Mapping]] = ..., next_restart_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., healthy: bool = ...) -> None: ...
