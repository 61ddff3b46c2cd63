import datetime

from shared.contracts.agentforge.v1 import checkpoint_pb2 as _checkpoint_pb2
from shared.contracts.agentforge.v1 import events_pb2 as _events_pb2
from shared.contracts.agentforge.v1 import pipeline_pb2 as _pipeline_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_COMPLETED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_COMPLETED: RunState
RUN_STATE_FAILED: RunState

class StartPipelineRequest(_message.Message):
    __slots__ = ("spec", "run_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    spec: _pipeline_pb2.PipelineSpec
    run_id: str
    def __init__(self, spec: _Optional[_Union[_pipeline_pb2.PipelineSpec, _Mapping]] = ..., run_id: _Optional[str] = ...) -> None: ...

class StartPipelineResponse(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id", "until_completed")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    UNTIL_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    until_completed: bool
    def __init__(self, run_id: _Optional[str] = ..., until_completed: _Optional[bool] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunStatus]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[RunStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ReplayRequest(_message.Message):
    __slots__ = ("run_id", "from_phase", "spec")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_PHASE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    from_phase: str
    spec: _pipeline_pb2.PipelineSpec
    def __init__(self, run_id: _Optional[str] = ..., from_phase: _Optional[str] = ..., spec: _Optional[_Union[_pipeline_pb2.PipelineSpec, _Mapping]] = ...) -> None: ...

class RunStatus(_message.Message):
    __slots__ = ("run_id", "state", "spec", "current_step", "current_fraction", "message", "completed_steps", "failure", "outputs", "started_at", "updated_at")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_STEPS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: RunState
    spec: _pipeline_pb2.PipelineSpec
    current_step: int
    current_fraction: float
    message: str
    completed_steps: _containers.RepeatedCompositeFieldContainer[_events_pb2.PhaseCompleted]
    failure: _events_pb2.PhaseFailed
    outputs: _containers.RepeatedCompositeFieldContainer[_checkpoint_pb2.CheckpointRef]
    started_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., spec: _Optional[_Union[_pipeline_pb2.PipelineSpec, _Mapping]] = ..., current_step: _Optional[int] = ..., current_fraction: _Optional[float] = ..., message: _Optional[str] = ..., completed_steps: _Optional[_Iterable[_Union[_events_pb2.PhaseCompleted, _Mapping]]] = ..., failure: _Optional[_Union[_events_pb2.PhaseFailed, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[_checkpoint_pb2.CheckpointRef, _Mapping]]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
