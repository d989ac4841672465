"""Reports: tables for the terminal and Markdown."""

from .table import eval_row, format_table

__all__ = ["eval_row", "format_table"]

from .mixed import plan_row, sensitivity_chart  # noqa: E402

__all__ += ["plan_row", "sensitivity_chart"]
