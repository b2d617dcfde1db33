"""Experiments of the Continuous DEQ paper, runnable from the command line."""
