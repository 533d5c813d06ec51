"""Domain errors raised by ``storage``; the protocol layers map each to one DICOM / HTTP status."""


class StorageError(Exception):
    """Base class of every error ``storage`` raises on purpose."""


class InvalidInstance(StorageError):
    """The object cannot be parsed, or lacks valid required UIDs, or is not a storage object."""


class SOPClassMismatch(StorageError):
    """The data set does not match the SOP Class the sender announced (PS3.4 B.2.3, 0xA900)."""


class StorageUnavailable(StorageError):
    """The index database or the blob store cannot be reached, or is full. Retry later."""


class NotFound(StorageError):
    """No such object in the index or the blob store."""


class Conflict(StorageError):
    """The request conflicts with what is stored."""


class InvalidQuery(StorageError):
    """A query the index cannot answer: unknown level or model, or a malformed matching value."""


class InstanceTooLarge(StorageError):
    """The object is over one of the size limits of ``[limits]`` (stored bytes, decoded pixel
    bytes, inflated bytes, frames): refused before the work is done, as Out of Resources
    (PS3.4 B.2.3, 0xA700). ``limit`` names the setting."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class InstanceTooComplex(InvalidInstance):
    """The data set nests sequences deeper, or holds more elements, than ``[limits]`` allow:
    refused as Cannot Understand (PS3.4 B.2.3, 0xC000). ``limit`` names the setting."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class InvalidArgument(StorageError):
    """An administration request with an invalid value (a partition name, an AE title, a
    network): nothing was changed."""


class DecodeFailed(StorageError):
    """Pixel data was not decoded (rendered, transcoded): the decoder refused it, or needed
    more memory or time than ``[limits]`` give one decode, or its process died
    (:mod:`storage.decoder_pool`). ``limit`` names the setting it passed, if any. The stored
    instance is unchanged and can still be retrieved as stored."""

    def __init__(self, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class DecodersBusy(StorageUnavailable):
    """No decoder process was free (or could be started) in time: retry later."""
