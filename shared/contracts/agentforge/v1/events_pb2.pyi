import datetime

from shared.contracts.agentforge.v1 import checkpoint_pb2 as _checkpoint_pb2
from shared.contracts.agentforge.v1 import pipeline_pb2 as _pipeline_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TraceContext(_message.Message):
    __slots__ = ("traceparent", "tracestate")
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    TRACESTATE_FIELD_NUMBER: _ClassVar[int]
    traceparent: str
    tracestate: str
    def __init__(self, traceparent: _Optional[str] = ..., tracestate: _Optional[str] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("event_id", "schema_version", "run_id", "trace", "created_at", "source", "pipeline_started", "model_ready", "phase_progress", "phase_failed", "pipeline_completed", "phase_completed")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_STARTED_FIELD_NUMBER: _ClassVar[int]
    MODEL_READY_FIELD_NUMBER: _ClassVar[int]
    PHASE_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FAILED_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    PHASE_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    schema_version: int
    run_id: str
    trace: TraceContext
    created_at: _timestamp_pb2.Timestamp
    source: str
    pipeline_started: PipelineStarted
    model_ready: ModelReady
    phase_progress: PhaseProgress
    phase_failed: PhaseFailed
    pipeline_completed: PipelineCompleted
    phase_completed: PhaseCompleted
    def __init__(self, event_id: _Optional[str] = ..., schema_version: _Optional[int] = ..., run_id: _Optional[str] = ..., trace: _Optional[_Union[TraceContext, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., pipeline_started: _Optional[_Union[PipelineStarted, _Mapping]] = ..., model_ready: _Optional[_Union[ModelReady, _Mapping]] = ..., phase_progress: _Optional[_Union[PhaseProgress, _Mapping]] = ..., phase_failed: _Optional[_Union[PhaseFailed, _Mapping]] = ..., pipeline_completed: _Optional[_Union[PipelineCompleted, _Mapping]] = ..., phase_completed: _Optional[_Union[PhaseCompleted, _Mapping]] = ...) -> None: ...

class PipelineStarted(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _pipeline_pb2.PipelineSpec
    def __init__(self, spec: _Optional[_Union[_pipeline_pb2.PipelineSpec, _Mapping]] = ...) -> None: ...

class ModelReady(_message.Message):
    __slots__ = ("spec", "step", "inputs")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    spec: _pipeline_pb2.PipelineSpec
    step: int
    inputs: _containers.RepeatedCompositeFieldContainer[_checkpoint_pb2.CheckpointRef]
    def __init__(self, spec: _Optional[_Union[_pipeline_pb2.PipelineSpec, _Mapping]] = ..., step: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[_checkpoint_pb2.CheckpointRef, _Mapping]]] = ...) -> None: ...

class PhaseProgress(_message.Message):
    __slots__ = ("step", "phase", "fraction", "message")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    step: int
    phase: str
    fraction: float
    message: str
    def __init__(self, step: _Optional[int] = ..., phase: _Optional[str] = ..., fraction: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class PhaseCompleted(_message.Message):
    __slots__ = ("step", "phase", "outputs", "report_json", "reused")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    step: int
    phase: str
    outputs: _containers.RepeatedCompositeFieldContainer[_checkpoint_pb2.CheckpointRef]
    report_json: str
    reused: bool
    def __init__(self, step: _Optional[int] = ..., phase: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[_checkpoint_pb2.CheckpointRef, _Mapping]]] = ..., report_json: _Optional[str] = ..., reused: _Optional[bool] = ...) -> None: ...

class PhaseFailed(_message.Message):
    __slots__ = ("step", "phase", "reason", "error", "attempts")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    phase: str
    reason: str
    error: str
    attempts: int
    def __init__(self, step: _Optional[int] = ..., phase: _Optional[str] = ..., reason: _Optional[str] = ..., error: _Optional[str] = ..., attempts: _Optional[int] = ...) -> None: ...

class PipelineCompleted(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[_checkpoint_pb2.CheckpointRef]
    def __init__(self, outputs: _Optional[_Iterable[_Union[_checkpoint_pb2.CheckpointRef, _Mapping]]] = ...) -> None: ...
