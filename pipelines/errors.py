"""Pipeline failures, each mapped to the exit code a scheduler acts on.

| code | meaning | what a scheduler should do |
|---|---|---|
| 0 | every requested date is complete | nothing |
| 1 | a stage raised (bug, resource, unexpected data) | alert; re-run resumes where it stopped |
| 2 | usage or configuration error | fix the command line or config; do not retry |
| 3 | an input is missing (raw file, or an earlier date not complete) | retry later |
| 4 | an input is present but malformed (schema, values) | fix the data; do not retry as is |
| 5 | another run holds the workspace lock | retry later |
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_STAGE_FAILED = 1
EXIT_USAGE = 2
EXIT_INPUT_MISSING = 3
EXIT_INPUT_INVALID = 4
EXIT_BUSY = 5


class PipelineError(Exception):
    """Base class: `exit_code` is what `muse pipeline` returns for it."""

    exit_code = EXIT_STAGE_FAILED


class StageFailed(PipelineError):
    """A stage raised an unexpected exception; the original is chained as `__cause__`."""

    exit_code = EXIT_STAGE_FAILED


class ConfigError(PipelineError):
    """A pipeline config file or flag is wrong."""

    exit_code = EXIT_USAGE


class InputMissing(PipelineError):
    """A raw input file, or an upstream partition the stage builds on, does not exist yet."""

    exit_code = EXIT_INPUT_MISSING


class InputInvalid(PipelineError):
    """An input exists but breaks its contract (schema, nulls, value ranges)."""

    exit_code = EXIT_INPUT_INVALID


class WorkspaceBusy(PipelineError):
    """Another process is running a pipeline in the same workspace."""

    exit_code = EXIT_BUSY
