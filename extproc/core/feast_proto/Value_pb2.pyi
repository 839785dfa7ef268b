from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Null(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NULL: _ClassVar[Null]
NULL: Null

class ValueType(_message.Message):
    __slots__ = ()
    class Enum(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        INVALID: _ClassVar[ValueType.Enum]
        BYTES: _ClassVar[ValueType.Enum]
        STRING: _ClassVar[ValueType.Enum]
        INT32: _ClassVar[ValueType.Enum]
        INT64: _ClassVar[ValueType.Enum]
        DOUBLE: _ClassVar[ValueType.Enum]
        FLOAT: _ClassVar[ValueType.Enum]
        BOOL: _ClassVar[ValueType.Enum]
        UNIX_TIMESTAMP: _ClassVar[ValueType.Enum]
        BYTES_LIST: _ClassVar[ValueType.Enum]
        STRING_LIST: _ClassVar[ValueType.Enum]
        INT32_LIST: _ClassVar[ValueType.Enum]
        INT64_LIST: _ClassVar[ValueType.Enum]
        DOUBLE_LIST: _ClassVar[ValueType.Enum]
        FLOAT_LIST: _ClassVar[ValueType.Enum]
        BOOL_LIST: _ClassVar[ValueType.Enum]
        UNIX_TIMESTAMP_LIST: _ClassVar[ValueType.Enum]
        NULL: _ClassVar[ValueType.Enum]
        MAP: _ClassVar[ValueType.Enum]
        MAP_LIST: _ClassVar[ValueType.Enum]
        BYTES_SET: _ClassVar[ValueType.Enum]
        STRING_SET: _ClassVar[ValueType.Enum]
        INT32_SET: _ClassVar[ValueType.Enum]
        INT64_SET: _ClassVar[ValueType.Enum]
        DOUBLE_SET: _ClassVar[ValueType.Enum]
        FLOAT_SET: _ClassVar[ValueType.Enum]
        BOOL_SET: _ClassVar[ValueType.Enum]
        UNIX_TIMESTAMP_SET: _ClassVar[ValueType.Enum]
        JSON: _ClassVar[ValueType.Enum]
        JSON_LIST: _ClassVar[ValueType.Enum]
        STRUCT: _ClassVar[ValueType.Enum]
        STRUCT_LIST: _ClassVar[ValueType.Enum]
        UUID: _ClassVar[ValueType.Enum]
        TIME_UUID: _ClassVar[ValueType.Enum]
        UUID_LIST: _ClassVar[ValueType.Enum]
        TIME_UUID_LIST: _ClassVar[ValueType.Enum]
        UUID_SET: _ClassVar[ValueType.Enum]
        TIME_UUID_SET: _ClassVar[ValueType.Enum]
        VALUE_LIST: _ClassVar[ValueType.Enum]
        VALUE_SET: _ClassVar[ValueType.Enum]
        DECIMAL: _ClassVar[ValueType.Enum]
        DECIMAL_LIST: _ClassVar[ValueType.Enum]
        DECIMAL_SET: _ClassVar[ValueType.Enum]
        SCALAR_MAP: _ClassVar[ValueType.Enum]
        ZONED_TIMESTAMP: _ClassVar[ValueType.Enum]
    INVALID: ValueType.Enum
    BYTES: ValueType.Enum
    STRING: ValueType.Enum
    INT32: ValueType.Enum
    INT64: ValueType.Enum
    DOUBLE: ValueType.Enum
    FLOAT: ValueType.Enum
    BOOL: ValueType.Enum
    UNIX_TIMESTAMP: ValueType.Enum
    BYTES_LIST: ValueType.Enum
    STRING_LIST: ValueType.Enum
    INT32_LIST: ValueType.Enum
    INT64_LIST: ValueType.Enum
    DOUBLE_LIST: ValueType.Enum
    FLOAT_LIST: ValueType.Enum
    BOOL_LIST: ValueType.Enum
    UNIX_TIMESTAMP_LIST: ValueType.Enum
    NULL: ValueType.Enum
    MAP: ValueType.Enum
    MAP_LIST: ValueType.Enum
    BYTES_SET: ValueType.Enum
    STRING_SET: ValueType.Enum
    INT32_SET: ValueType.Enum
    INT64_SET: ValueType.Enum
    DOUBLE_SET: ValueType.Enum
    FLOAT_SET: ValueType.Enum
    BOOL_SET: ValueType.Enum
    UNIX_TIMESTAMP_SET: ValueType.Enum
    JSON: ValueType.Enum
    JSON_LIST: ValueType.Enum
    STRUCT: ValueType.Enum
    STRUCT_LIST: ValueType.Enum
    UUID: ValueType.Enum
    TIME_UUID: ValueType.Enum
    UUID_LIST: ValueType.Enum
    TIME_UUID_LIST: ValueType.Enum
    UUID_SET: ValueType.Enum
    TIME_UUID_SET: ValueType.Enum
    VALUE_LIST: ValueType.Enum
    VALUE_SET: ValueType.Enum
    DECIMAL: ValueType.Enum
    DECIMAL_LIST: ValueType.Enum
    DECIMAL_SET: ValueType.Enum
    SCALAR_MAP: ValueType.Enum
    ZONED_TIMESTAMP: ValueType.Enum
    def __init__(self) -> None: ...

class Value(_message.Message):
    __slots__ = ("bytes_val", "string_val", "int32_val", "int64_val", "double_val", "float_val", "bool_val", "unix_timestamp_val", "bytes_list_val", "string_list_val", "int32_list_val", "int64_list_val", "double_list_val", "float_list_val", "bool_list_val", "unix_timestamp_list_val", "null_val", "map_val", "map_list_val", "bytes_set_val", "string_set_val", "int32_set_val", "int64_set_val", "double_set_val", "float_set_val", "bool_set_val", "unix_timestamp_set_val", "json_val", "json_list_val", "struct_val", "struct_list_val", "uuid_val", "time_uuid_val", "uuid_list_val", "time_uuid_list_val", "uuid_set_val", "time_uuid_set_val", "list_val", "set_val", "decimal_val", "decimal_list_val", "decimal_set_val", "scalar_map_val", "zoned_timestamp_val")
    BYTES_VAL_FIELD_NUMBER: _ClassVar[int]
    STRING_VAL_FIELD_NUMBER: _ClassVar[int]
    INT32_VAL_FIELD_NUMBER: _ClassVar[int]
    INT64_VAL_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VAL_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VAL_FIELD_NUMBER: _ClassVar[int]
    BOOL_VAL_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIMESTAMP_VAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    STRING_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    INT32_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    INT64_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    FLOAT_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    BOOL_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIMESTAMP_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    NULL_VAL_FIELD_NUMBER: _ClassVar[int]
    MAP_VAL_FIELD_NUMBER: _ClassVar[int]
    MAP_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_SET_VAL_FIELD_NUMBER: _ClassVar[int]
    STRING_SET_VAL_FIELD_NUMBER: _ClassVar[int]
    INT32_SET_VAL_FIELD_NUMBER: _ClassVar[int]
    INT64_SET_VAL_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_SET_VAL_FIELD_NUMBER: _ClassVar[int]
    FLOAT_SET_VAL_FIELD_NUMBER: _ClassVar[int]
    BOOL_SET_VAL_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIMESTAMP_SET_VAL_FIELD_NUMBER: _ClassVar[int]
    JSON_VAL_FIELD_NUMBER: _ClassVar[int]
    JSON_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    STRUCT_VAL_FIELD_NUMBER: _ClassVar[int]
    STRUCT_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    UUID_VAL_FIELD_NUMBER: _ClassVar[int]
    TIME_UUID_VAL_FIELD_NUMBER: _ClassVar[int]
    UUID_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    TIME_UUID_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    UUID_SET_VAL_FIELD_NUMBER: _ClassVar[int]
    TIME_UUID_SET_VAL_FIELD_NUMBER: _ClassVar[int]
    LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    SET_VAL_FIELD_NUMBER: _ClassVar[int]
    DECIMAL_VAL_FIELD_NUMBER: _ClassVar[int]
    DECIMAL_LIST_VAL_FIELD_NUMBER: _ClassVar[int]
    DECIMAL_SET_VAL_FIELD_NUMBER: _ClassVar[int]
    SCALAR_MAP_VAL_FIELD_NUMBER: _ClassVar[int]
    ZONED_TIMESTAMP_VAL_FIELD_NUMBER: _ClassVar[int]
    bytes_val: bytes
    string_val: str
    int32_val: int
    int64_val: int
    double_val: float
    float_val: float
    bool_val: bool
    unix_timestamp_val: int
    bytes_list_val: BytesList
    string_list_val: StringList
    int32_list_val: Int32List
    int64_list_val: Int64List
    double_list_val: DoubleList
    float_list_val: FloatList
    bool_list_val: BoolList
    unix_timestamp_list_val: Int64List
    null_val: Null
    map_val: Map
    map_list_val: MapList
    bytes_set_val: BytesSet
    string_set_val: StringSet
    int32_set_val: Int32Set
    int64_set_val: Int64Set
    double_set_val: DoubleSet
    float_set_val: FloatSet
    bool_set_val: BoolSet
    unix_timestamp_set_val: Int64Set
    json_val: str
    json_list_val: StringList
    struct_val: Map
    struct_list_val: MapList
    uuid_val: str
    time_uuid_val: str
    uuid_list_val: StringList
    time_uuid_list_val: StringList
    uuid_set_val: StringSet
    time_uuid_set_val: StringSet
    list_val: RepeatedValue
    set_val: RepeatedValue
    decimal_val: str
    decimal_list_val: StringList
    decimal_set_val: StringSet
    scalar_map_val: ScalarMap
    zoned_timestamp_val: ZonedTimestamp
    def __init__(self, bytes_val: _Optional[bytes] = ..., string_val: _Optional[str] = ..., int32_val: _Optional[int] = ..., int64_val: _Optional[int] = ..., double_val: _Optional[float] = ..., float_val: _Optional[float] = ..., bool_val: _Optional[bool] = ..., unix_timestamp_val: _Optional[int] = ..., bytes_list_val: _Optional[_Union[BytesList, _Mapping]] = ..., string_list_val: _Optional[_Union[StringList, _Mapping]] = ..., int32_list_val: _Optional[_Union[Int32List, _Mapping]] = ..., int64_list_val: _Optional[_Union[Int64List, _Mapping]] = ..., double_list_val: _Optional[_Union[DoubleList, _Mapping]] = ..., float_list_val: _Optional[_Union[FloatList, _Mapping]] = ..., bool_list_val: _Optional[_Union[BoolList, _Mapping]] = ..., unix_timestamp_list_val: _Optional[_Union[Int64List, _Mapping]] = ..., null_val: _Optional[_Union[Null, str]] = ..., map_val: _Optional[_Union[Map, _Mapping]] = ..., map_list_val: _Optional[_Union[MapList, _Mapping]] = ..., bytes_set_val: _Optional[_Union[BytesSet, _Mapping]] = ..., string_set_val: _Optional[_Union[StringSet, _Mapping]] = ..., int32_set_val: _Optional[_Union[Int32Set, _Mapping]] = ..., int64_set_val: _Optional[_Union[Int64Set, _Mapping]] = ..., double_set_val: _Optional[_Union[DoubleSet, _Mapping]] = ..., float_set_val: _Optional[_Union[FloatSet, _Mapping]] = ..., bool_set_val: _Optional[_Union[BoolSet, _Mapping]] = ..., unix_timestamp_set_val: _Optional[_Union[Int64Set, _Mapping]] = ..., json_val: _Optional[str] = ..., json_list_val: _Optional[_Union[StringList, _Mapping]] = ..., struct_val: _Optional[_Union[Map, _Mapping]] = ..., struct_list_val: _Optional[_Union[MapList, _Mapping]] = ..., uuid_val: _Optional[str] = ..., time_uuid_val: _Optional[str] = ..., uuid_list_val: _Optional[_Union[StringList, _Mapping]] = ..., time_uuid_list_val: _Optional[_Union[StringList, _Mapping]] = ..., uuid_set_val: _Optional[_Union[StringSet, _Mapping]] = ..., time_uuid_set_val: _Optional[_Union[StringSet, _Mapping]] = ..., list_val: _Optional[_Union[RepeatedValue, _Mapping]] = ..., set_val: _Optional[_Union[RepeatedValue, _Mapping]] = ..., decimal_val: _Optional[str] = ..., decimal_list_val: _Optional[_Union[StringList, _Mapping]] = ..., decimal_set_val: _Optional[_Union[StringSet, _Mapping]] = ..., scalar_map_val: _Optional[_Union[ScalarMap, _Mapping]] = ..., zoned_timestamp_val: _Optional[_Union[ZonedTimestamp, _Mapping]] = ...) -> None: ...

class ZonedTimestamp(_message.Message):
    __slots__ = ("unix_timestamp", "zone")
    UNIX_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    unix_timestamp: int
    zone: str
    def __init__(self, unix_timestamp: _Optional[int] = ..., zone: _Optional[str] = ...) -> None: ...

class BytesList(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, val: _Optional[_Iterable[bytes]] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, val: _Optional[_Iterable[str]] = ...) -> None: ...

class Int32List(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, val: _Optional[_Iterable[int]] = ...) -> None: ...

class Int64List(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, val: _Optional[_Iterable[int]] = ...) -> None: ...

class DoubleList(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, val: _Optional[_Iterable[float]] = ...) -> None: ...

class FloatList(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, val: _Optional[_Iterable[float]] = ...) -> None: ...

class BoolList(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, val: _Optional[_Iterable[bool]] = ...) -> None: ...

class BytesSet(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, val: _Optional[_Iterable[bytes]] = ...) -> None: ...

class StringSet(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, val: _Optional[_Iterable[str]] = ...) -> None: ...

class Int32Set(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, val: _Optional[_Iterable[int]] = ...) -> None: ...

class Int64Set(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, val: _Optional[_Iterable[int]] = ...) -> None: ...

class DoubleSet(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, val: _Optional[_Iterable[float]] = ...) -> None: ...

class FloatSet(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, val: _Optional[_Iterable[float]] = ...) -> None: ...

class BoolSet(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, val: _Optional[_Iterable[bool]] = ...) -> None: ...

class Map(_message.Message):
    __slots__ = ("val",)
    class ValEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.MessageMap[str, Value]
    def __init__(self, val: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class MapList(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedCompositeFieldContainer[Map]
    def __init__(self, val: _Optional[_Iterable[_Union[Map, _Mapping]]] = ...) -> None: ...

class RepeatedValue(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, val: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class MapKey(_message.Message):
    __slots__ = ("int32_key", "int64_key", "float_key", "double_key", "bool_key", "unix_timestamp_key", "bytes_key", "uuid_key", "time_uuid_key", "decimal_key")
    INT32_KEY_FIELD_NUMBER: _ClassVar[int]
    INT64_KEY_FIELD_NUMBER: _ClassVar[int]
    FLOAT_KEY_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_KEY_FIELD_NUMBER: _ClassVar[int]
    BOOL_KEY_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIMESTAMP_KEY_FIELD_NUMBER: _ClassVar[int]
    BYTES_KEY_FIELD_NUMBER: _ClassVar[int]
    UUID_KEY_FIELD_NUMBER: _ClassVar[int]
    TIME_UUID_KEY_FIELD_NUMBER: _ClassVar[int]
    DECIMAL_KEY_FIELD_NUMBER: _ClassVar[int]
    int32_key: int
    int64_key: int
    float_key: float
    double_key: float
    bool_key: bool
    unix_timestamp_key: int
    bytes_key: bytes
    uuid_key: str
    time_uuid_key: str
    decimal_key: str
    def __init__(self, int32_key: _Optional[int] = ..., int64_key: _Optional[int] = ..., float_key: _Optional[float] = ..., double_key: _Optional[float] = ..., bool_key: _Optional[bool] = ..., unix_timestamp_key: _Optional[int] = ..., bytes_key: _Optional[bytes] = ..., uuid_key: _Optional[str] = ..., time_uuid_key: _Optional[str] = ..., decimal_key: _Optional[str] = ...) -> None: ...

class ScalarMapEntry(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: MapKey
    value: Value
    def __init__(self, key: _Optional[_Union[MapKey, _Mapping]] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class ScalarMap(_message.Message):
    __slots__ = ("val",)
    VAL_FIELD_NUMBER: _ClassVar[int]
    val: _containers.RepeatedCompositeFieldContainer[ScalarMapEntry]
    def __init__(self, val: _Optional[_Iterable[_Union[ScalarMapEntry, _Mapping]]] = ...) -> None: ...
