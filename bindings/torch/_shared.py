"""Temporary re-export shim (issue 23): the names of the old ``_shared`` module, now defined in
:mod:`.modules`, :mod:`.distributed`, :mod:`.container`, :mod:`.lifecycle`, :mod:`.targets` and
:mod:`.files`.  Removed once nothing imports it."""

from .container import AdapterContainer, check_adapter_name, container_of
from .distributed import dtensor_type, fsdp_sharded, gather_full, refuse_if_sharded, refuse_sharded_values
from .files.card import base_model_record, model_card
from .files.layout import ADAPTER_FILE, MODULES_TO_SAVE_PREFIX
from .files.write import write_gathered
from .lifecycle import BaseAdapter
from .modules import (
    ADAPTER_ATTRIBUTE,
    ReadsThrough,
    ThreadState,
    accept_base_keys,
    base_forward,
    forward_kind,
    graph_task_id,
    is_quantized,
    plain_named_modules,
    replace_module,
    report_base_keys,
)
from .targets import check_targets, select_modules_to_save

__all__ = ["ADAPTER_ATTRIBUTE", "ADAPTER_FILE", "MODULES_TO_SAVE_PREFIX", "AdapterContainer", "BaseAdapter",
           "ReadsThrough", "ThreadState", "accept_base_keys", "base_forward", "base_model_record",
           "check_adapter_name", "check_targets", "container_of", "dtensor_type", "forward_kind", "fsdp_sharded",
           "gather_full", "graph_task_id", "is_quantized", "model_card", "plain_named_modules", "refuse_if_sharded",
           "refuse_sharded_values", "replace_module", "report_base_keys", "select_modules_to_save", "write_gathered"]
