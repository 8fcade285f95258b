"""What every process shares besides the contract: AMQP, settings, logs, tracing, metrics, ..."""
