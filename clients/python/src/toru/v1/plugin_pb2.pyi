import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PluginState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLUGIN_STATE_UNSPECIFIED: _ClassVar[PluginState]
    PLUGIN_STATE_STOPPED: _ClassVar[PluginState]
    PLUGIN_STATE_STARTING: _ClassVar[PluginState]
    PLUGIN_STATE_RUNNING: _ClassVar[PluginState]
    PLUGIN_STATE_STOPPING: _ClassVar[PluginState]
    PLUGIN_STATE_BACKOFF: _ClassVar[PluginState]
    PLUGIN_STATE_CRASHED: _ClassVar[PluginState]
    PLUGIN_STATE_DISABLED: _ClassVar[PluginState]
PLUGIN_STATE_UNSPECIFIED: PluginState
PLUGIN_STATE_STOPPED: PluginState
PLUGIN_STATE_STARTING: PluginState
PLUGIN_STATE_RUNNING: PluginState
PLUGIN_STATE_STOPPING: PluginState
PLUGIN_STATE_BACKOFF: PluginState
PLUGIN_STATE_CRASHED: PluginState
PLUGIN_STATE_DISABLED: PluginState

class Plugin(_message.Message):
    __slots__ = ("id", "name", "version", "author", "description", "icon", "route", "binary_path", "enabled", "state", "healthy", "pid", "started_at", "restart_count", "consecutive_failures", "next_restart_at", "last_exit", "last_error", "protocol_version")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ICON_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    BINARY_PATH_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    NEXT_RESTART_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    version: str
    author: str
    description: str
    icon: str
    route: str
    binary_path: str
    enabled: bool
    state: PluginState
    healthy: bool
    pid: int
    started_at: _timestamp_pb2.Timestamp
    restart_count: int
    consecutive_failures: int
    next_restart_at: _timestamp_pb2.Timestamp
    last_exit: ExitInfo
    last_error: str
    protocol_version: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., author: _Optional[str] = ..., description: _Optional[str] = ..., icon: _Optional[str] = ..., route: _Optional[str] = ..., binary_path: _Optional[str] = ..., enabled: bool = ..., state: _Optional[_Union[PluginState, str]] = ..., healthy: bool = ..., pid: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., restart_count: _Optional[int] = ..., consecutive_failures: _Optional[int] = ..., next_restart_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_exit: _Optional[_Union[ExitInfo, _Mapping]] = ..., last_error: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class ExitInfo(_message.Message):
    __slots__ = ("code", "signal", "time", "stderr_tail")
    CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STDERR_TAIL_FIELD_NUMBER: _ClassVar[int]
    code: int
    signal: int
    time: _timestamp_pb2.Timestamp
    stderr_tail: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, code: _Optional[int] = ..., signal: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stderr_tail: _Optional[_Iterable[str]] = ...) -> None: ...

class SkippedPlugin(_message.Message):
    __slots__ = ("path", "reason")
    PATH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    path: str
    reason: str
    def __init__(self, path: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
