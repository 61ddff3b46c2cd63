from shared.contracts.agentforge.v1 import checkpoint_pb2 as _checkpoint_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PhaseStep(_message.Message):
    __slots__ = ("phase", "config_json", "gate_json")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    GATE_JSON_FIELD_NUMBER: _ClassVar[int]
    phase: str
    config_json: str
    gate_json: str
    def __init__(self, phase: _Optional[str] = ..., config_json: _Optional[str] = ..., gate_json: _Optional[str] = ...) -> None: ...

class PipelineSpec(_message.Message):
    __slots__ = ("name", "steps", "inputs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    steps: _containers.RepeatedCompositeFieldContainer[PhaseStep]
    inputs: _containers.RepeatedCompositeFieldContainer[_checkpoint_pb2.CheckpointRef]
    def __init__(self, name: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[PhaseStep, _Mapping]]] = ..., inputs: _Optional[_Iterable[_Union[_checkpoint_pb2.CheckpointRef, _Mapping]]] = ...) -> None: ...
