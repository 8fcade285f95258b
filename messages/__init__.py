"""The contract between our services: message models, codec, topology names, shared plumbing."""
