from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckpointRef(_message.Message):
    __slots__ = ("uri", "sha256", "size", "version_id", "format", "digest", "name", "lineage")
    URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    uri: str
    sha256: str
    size: int
    version_id: str
    format: str
    digest: str
    name: str
    lineage: Lineage
    def __init__(self, uri: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., version_id: _Optional[str] = ..., format: _Optional[str] = ..., digest: _Optional[str] = ..., name: _Optional[str] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ...) -> None: ...

class Lineage(_message.Message):
    __slots__ = ("parent_digests", "phase", "code_version", "config_hash")
    PARENT_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    CODE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    parent_digests: _containers.RepeatedScalarFieldContainer[str]
    phase: str
    code_version: str
    config_hash: str
    def __init__(self, parent_digests: _Optional[_Iterable[str]] = ..., phase: _Optional[str] = ..., code_version: _Optional[str] = ..., config_hash: _Optional[str] = ...) -> None: ...
