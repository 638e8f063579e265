"""Temporary re-export shim (issue 23): the names of the old ``_io`` module, now in :mod:`.files`
(and :mod:`.methods` for ``check_file``, :mod:`.targets` for ``check_model_targets``).  Removed
once nothing imports it."""

from .files.layout import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    LIBRARY,
    MAX_CONFIG_BYTES,
    MAX_METADATA_DEPTH,
    PARAM_DTYPES,
    README_FILE,
    AdapterFileError,
    adapter_path,
    adapter_subfolders,
    glob_escape,
    locate_adapter,
)
from .files.read import (
    check_config_file,
    check_saved_modules,
    parse_metadata,
    read_adapter,
    read_json_file,
    read_metadata,
)
from .files.write import canonical_header, write_adapter, write_bytes
from .methods import check_file
from .targets import check_model_targets

__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "LIBRARY", "MAX_CONFIG_BYTES", "MAX_METADATA_DEPTH",
           "PARAM_DTYPES", "README_FILE", "AdapterFileError", "adapter_path", "adapter_subfolders", "canonical_header",
           "check_config_file", "check_file", "check_model_targets", "check_saved_modules", "glob_escape",
           "locate_adapter", "parse_metadata", "read_adapter", "read_json_file", "read_metadata", "write_adapter",
           "write_bytes"]
