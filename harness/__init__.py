"""The matrix harness: cells, their environments, the runner and the reports."""
