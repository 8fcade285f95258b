"""The message contract: models, the codec and topology names. Imports only messages.errors."""
