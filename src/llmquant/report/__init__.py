"""Reports: tables for the terminal and Markdown."""

from .table import eval_row, format_table

__all__ = ["eval_row", "format_table"]
