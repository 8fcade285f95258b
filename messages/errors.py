"""The project's one error tree: every error we raise on purpose derives from SagaError."""


class SagaError(Exception):
    """Raised for any failure this project reports on purpose."""


class DecodeError(SagaError):
    """Raised when an incoming message cannot be turned into a known, valid model.

    ``reason`` is a short machine-readable code that ends up in the dead-letter headers.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class PublishFailedError(SagaError):
    """Raised when the broker did not confirm a publish (nack, unroutable or channel lost)."""


class StoreTransientError(SagaError):
    """Raised when a service's database failed for a moment, through no fault of the message.

    It did not answer (a restart, a failover, a network cut), or it gave up a transaction to
    break a deadlock. The message is requeued without counting against SAGA_MAX_DELIVERIES,
    and handled again once the database is back.
    """


class ConfigurationError(SagaError):
    """Raised when a command-line option or setting cannot be used."""


class SagaNotFoundError(SagaError):
    """Raised when a saga id names no saga in the store."""


class Rejected(SagaError):
    """Raised by a message handler when a well-formed message does not belong here.

    The delivery is dead-lettered with ``reason`` and ``detail`` in its headers.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ConcurrentUpdateError(SagaError):
    """Raised when a saga changed in the store since it was read (another writer won)."""


class DefinitionError(ConfigurationError):
    """Raised when a saga definition breaks the rules of sagas (e.g. undoable after the pivot)."""


class AlreadyRunningError(ConfigurationError):
    """Raised when another orchestrator already owns this store or this vhost's queues."""


class UnavailableError(SagaError):
    """Raised when something a service needs stayed out of reach longer than it may wait."""


class BrokerUnavailableError(UnavailableError):
    """Raised when the broker stayed out of reach longer than the service may wait for it."""


class StoreUnavailableError(UnavailableError):
    """Raised when the saga store could not be written for longer than a lease lasts."""


class NoNodeAnsweredError(SagaError):
    """Raised when no node of SAGA_AMQP_URL answered one round of connection attempts."""


class UnreadableSagaError(SagaError):
    """Raised when a stored saga cannot be read back (corrupt, or from an unknown version)."""


class InvalidQueryError(SagaError):
    """Raised when a request to the web console (a filter, a form field) cannot be used."""
