"""The command line: argument parsing and rendering only; all logic lives below it."""
