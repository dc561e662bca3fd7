"""BackdoorBench (SCLBD) plugin: read its attack records safely, defend them with any registered
defense through our harness, write its defense results and index files, export our runs as its
records, and install CGD into a BackdoorBench checkout. Formats: docs/reference/backdoorbench.md."""
from .defend import defend_record, split_record, write_index_file
from .export import export_run
from .install import install, uninstall
from .record import BackdoorBenchRecord, read_record
from .safe_load import UnsafeRecordError, load_pickled

__all__ = ["BackdoorBenchRecord", "UnsafeRecordError", "defend_record", "export_run", "install", "load_pickled",
           "read_record", "split_record", "uninstall", "write_index_file"]
