"""The old private name of :mod:`.files` that ``tensoradapt.demo`` still imports (``write_bytes`` in
demo/report.py, demo/plot.py and demo/resume.py): a re-export of the file layer, nothing else.  Remove
it once those import :mod:`tensoradapt.torch.files.write`."""

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

__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "LIBRARY", "MAX_CONFIG_BYTES", "MAX_METADATA_DEPTH",
           "PARAM_DTYPES", "README_FILE", "AdapterFileError", "adapter_path", "adapter_subfolders", "canonical_header",
           "check_config_file", "check_saved_modules", "glob_escape", "locate_adapter", "parse_metadata",
           "read_adapter", "read_json_file", "read_metadata", "write_adapter", "write_bytes"]
