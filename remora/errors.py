"""Errors shared by every remora component, each with a stable process exit code.

A command catches :class:`RemoraError` at the top (see :mod:`remora.cli`), prints its message and
exits with ``exit_code``; scripts and CI can branch on the code without parsing text.

=====  =====================================================================================
code   meaning
=====  =====================================================================================
1      any other remora error (:class:`RemoraError`)
2      usage: bad arguments or configuration (:class:`UsageError`)
3      invalid input: corrupt, hostile or lying data, wrong digest (:class:`InvalidInput`)
4      authentication or authorization refused (:class:`AuthError`)
5      not found (:class:`NotFound`)
6      the registry failed or could not be reached (:class:`RegistryError`)
7      local storage failed: disk full, permissions, I/O (:class:`StorageError`)
8      already exists (:class:`AlreadyExists`)
9      a remora or containerd service is unavailable (:class:`ServiceUnavailable`)
130    interrupted (Ctrl-C)
=====  =====================================================================================

Every error a component raises across a module boundary derives from one of these; exceptions
private to one module (control flow inside it) may stay plain, with a leading underscore.
"""
from __future__ import annotations


class RemoraError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(RemoraError):
    """Bad command-line arguments or configuration."""

    exit_code = 2


class InvalidInput(RemoraError):
    """Input that is corrupt or not what it claims: bad digest, truncated stream, lying tar, bad JSON."""

    exit_code = 3


class DigestMismatch(InvalidInput):
    """Bytes whose sha256 does not match the digest they were addressed by."""

    def __init__(self, what: str, expected: str, actual: str):
        super().__init__(f"{what}: digest mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class UnsupportedMediaType(InvalidInput):
    """A manifest, index or layer media type remora does not know."""


class AuthError(RemoraError):
    """The registry refused our credentials (401/403)."""

    exit_code = 4


class NotFound(RemoraError):
    """Image, tag, blob or path that does not exist."""

    exit_code = 5


class RegistryError(RemoraError):
    """The registry failed (5xx, protocol error) or could not be reached (connection, timeout)."""

    exit_code = 6


class StorageError(RemoraError):
    """Local storage failed: disk full, permission denied, I/O error."""

    exit_code = 7


class AlreadyExists(RemoraError):
    """A name that must be new is taken (a snapshot key, containerd's ALREADY_EXISTS, a task id)."""

    exit_code = 8


class ServiceUnavailable(RemoraError):
    """A remora daemon (pull service, manager, scheduler) or containerd cannot be reached."""

    exit_code = 9
